"""Parity verification: an export folder against its PyTorch reference, with CI reports.

from shira_export.verify import verify
report = verify(model="base/", adapters=["adapter/"], candidate="out/", profile="fp32")
report.raise_for_failures()
"""

from shira_export.verify.api import REPORT_NAME, export_check_settings, manifest_profile, verify
from shira_export.verify.profiles import Precision, Profile, get_profile
from shira_export.verify.report import SCHEMA, SCHEMA_VERSION, CheckRecord, VerifyReport

__all__ = [
    "verify",
    "VerifyReport",
    "CheckRecord",
    "Precision",
    "Profile",
    "get_profile",
    "REPORT_NAME",
    "SCHEMA",
    "SCHEMA_VERSION",
    "export_check_settings",
    "manifest_profile",
]
