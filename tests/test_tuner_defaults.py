"""Default target modules (target_modules=None) for every model type of PEFT's SHiRA
mapping, each on a tiny model built from its config, with PEFT as the oracle: the same
modules are adapted, and our saved adapter gives PEFT's outputs."""

from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch

from shira_export import ShiraConfig, ShiraModel, get_shira_model
from shira_export.tuner.defaults import DEFAULT_TARGET_MODULES

transformers = pytest.importorskip("transformers")
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES  # noqa: E402

_SMALL = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    vocab_size=128,
    max_position_embeddings=64,
)
_TEXT = dict(_SMALL, num_key_value_heads=2, head_dim=8)
_T5 = dict(d_model=32, d_ff=64, d_kv=8, num_layers=2, num_decoder_layers=2, num_heads=4, vocab_size=128)
_BART = dict(
    d_model=32,
    encoder_layers=1,
    decoder_layers=1,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    vocab_size=128,
    max_position_embeddings=64,
)
_OPT_TEXT = dict(
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=4,
    ffn_dim=64,
    vocab_size=128,
    word_embed_proj_dim=32,
    max_position_embeddings=64,
)

# model_type -> config kwargs; model types absent from the installed transformers are skipped.
TINY: dict[str, dict] = {
    "t5": _T5,
    "mt5": _T5,
    "bart": _BART,
    "blip-2": dict(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            image_size=16,
            patch_size=8,
        ),
        qformer_config=dict(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=64,
            encoder_hidden_size=32,
            vocab_size=128,
        ),
        text_config=dict(_OPT_TEXT, model_type="opt"),
        num_query_tokens=2,
        image_token_index=127,
    ),
    "bert": _SMALL,
    "roberta": _SMALL,
    "xlm-roberta": _SMALL,
    "electra": dict(_SMALL, embedding_size=32),
    "layoutlm": _SMALL,
    "deberta": _SMALL,
    "deberta-v2": _SMALL,
    "distilbert": dict(dim=32, hidden_dim=64, n_layers=2, n_heads=4, vocab_size=128, max_position_embeddings=64),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64),
    "gpt_bigcode": dict(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64),
    "bloom": dict(hidden_size=32, n_layer=2, n_head=4, vocab_size=128),
    "gpt_neox": dict(_SMALL),
    "falcon": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=128),
    "mpt": dict(d_model=32, n_layers=2, n_heads=4, expansion_ratio=2, max_seq_len=64, vocab_size=128),
    "codegen": dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, vocab_size=128, n_positions=64, n_ctx=64),
    "opt": dict(_OPT_TEXT, num_hidden_layers=2),
    "gptj": dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, vocab_size=128, n_positions=64),
    "gpt_neo": dict(
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        attention_types=[[["global", "local"], 1]],
        vocab_size=128,
        max_position_embeddings=64,
        window_size=8,
    ),
    "llama": _TEXT,
    "mistral": _TEXT,
    "mixtral": dict(_TEXT, num_local_experts=2, num_experts_per_tok=1),
    "stablelm": _TEXT,
    "phi": _TEXT,
    "gemma": _TEXT,
    "gemma2": _TEXT,
    "gemma3_text": _TEXT,
    "qwen2": _TEXT,
    "qwen3": _TEXT,
    "llama4": dict(
        text_config=dict(_TEXT, intermediate_size_mlp=64, num_local_experts=2, interleave_moe_layer_step=1),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            image_size=16,
            patch_size=8,
            vision_output_dim=32,
            projector_input_dim=32,
            projector_output_dim=32,
        ),
    ),
    "nemotron_h": dict(
        _TEXT,
        hybrid_override_pattern="M*",
        mamba_num_heads=4,
        mamba_head_dim=8,
        n_groups=1,
        ssm_state_size=8,
        mamba_d_conv=2,
        expand=1,
    ),
    "rwkv": dict(
        hidden_size=32,
        num_hidden_layers=2,
        attention_hidden_size=32,
        intermediate_size=64,
        vocab_size=128,
        context_length=64,
    ),
}
# Types in PEFT's mapping with no transformers implementation (remote code or gone):
# chatglm, btlm, RefinedWeb, RefinedWebModel, rwkv7; gemma4 needs a vision+audio stack.
_MULTIMODAL = {"blip-2", "llama4"}
NOT_BUILT = {"chatglm", "btlm", "RefinedWeb", "RefinedWebModel", "rwkv7", "gemma4"}


def test_the_table_covers_peft_mapping():
    peft_constants = pytest.importorskip("peft.utils.constants")
    theirs = peft_constants.TRANSFORMERS_MODELS_TO_SHIRA_TARGET_MODULES_MAPPING
    for model_type, targets in theirs.items():
        ours = DEFAULT_TARGET_MODULES[model_type]
        assert (sorted(ours) if isinstance(ours, list) else ours) == (
            sorted(targets) if isinstance(targets, list) else targets
        ), model_type
    assert set(DEFAULT_TARGET_MODULES) - set(theirs) <= {"distilbert"}  # ours beyond PEFT's
    assert set(TINY) | NOT_BUILT == set(DEFAULT_TARGET_MODULES)


def _tiny(model_type: str) -> torch.nn.Module:
    if model_type not in CONFIG_MAPPING_NAMES:
        pytest.skip(f"transformers {transformers.__version__} has no model type {model_type!r}")
    config = transformers.AutoConfig.for_model(model_type, **TINY[model_type])
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:  # multimodal: the whole model (its causal-LM class holds only the text part)
            if model_type in _MULTIMODAL:
                raise ValueError
            model = transformers.AutoModelForCausalLM.from_config(config)
        except ValueError:  # encoders, encoder-decoders, multimodal: the bare model
            model = transformers.AutoModel.from_config(config)
    return model.eval()


def _inputs(model: torch.nn.Module) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 100, (2, 6), generator=g)
    kwargs = {"input_ids": ids}
    names = inspect.signature(model.forward).parameters
    if getattr(model.config, "is_encoder_decoder", False):
        kwargs["decoder_input_ids"] = ids[:, :4]
    if "pixel_values" in names and names["pixel_values"].default is inspect.Parameter.empty:
        vision = model.config.vision_config
        kwargs["pixel_values"] = torch.randn(2, 3, vision.image_size, vision.image_size, generator=g)
        image_token = getattr(model.config, "image_token_index", None)
        if image_token is not None:  # blip-2: the query tokens' places in the text
            ids[:, : model.config.num_query_tokens] = image_token
    return kwargs


def _output(out) -> torch.Tensor:
    if isinstance(out, tuple):
        return out[0]
    for name in ("logits", "last_hidden_state"):
        value = getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return value
    return out[0]


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_default_targets_match_peft(model_type, tmp_path):
    base = _tiny(model_type)
    ours = get_shira_model(copy.deepcopy(base), ShiraConfig(r=1, init_weights=False, random_seed=3))
    paths = sorted(p for p, _ in ours.shira_layers())
    leaves = DEFAULT_TARGET_MODULES[model_type]
    assert paths and all(p.rsplit(".", 1)[-1] in leaves for p in paths)
    x = _inputs(base)
    try:
        with torch.no_grad():
            reference = _output(base(**x))
    except AttributeError:  # transformers 5.x llama4: its output class lacks a field it fills
        reference = None
    if reference is not None:
        with torch.no_grad():
            assert (_output(ours(**x)) - reference).abs().max() > 1e-4  # the adapter acts
    peft = pytest.importorskip("peft")
    if model_type == "gpt2":  # GPT-2's c_attn is a Conv1D: PEFT's SHiRA adapts nn.Linear only
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if model_type != "distilbert":  # not in PEFT's mapping: compared through the saved adapter only
            theirs = peft.get_peft_model(copy.deepcopy(base), peft.ShiraConfig(r=1))
            their_paths = sorted(
                n[len("base_model.model.") :]
                for n, m in theirs.named_modules()
                if isinstance(m, peft.tuners.shira.ShiraLayer)
            )
            assert paths == their_paths
        ours.save_pretrained(tmp_path)
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    if reference is not None:
        with torch.no_grad():
            assert (_output(loaded(**x)) - _output(ours(**x))).abs().max() <= 1e-5
    back = ShiraModel.from_pretrained(copy.deepcopy(base), tmp_path)  # saved targets name the defaults
    assert sorted(p for p, _ in back.shira_layers()) == paths
