"""What lies on disk, shared by every stage: reading Hugging Face model folders safely
(`hf_folder`). Stages read and write folders through this package, never through each
other's internals."""
