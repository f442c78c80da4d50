"""A tiny random-weight reward model (LlamaForSequenceClassification, one label) for reward tests."""

from pathlib import Path


def save_tiny_classifier(tiny_model: Path, out: Path) -> Path:
    """Save a 2-layer random classifier with the tiny test model's tokenizer (and chat template) to `out`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tiny_model, local_files_only=True)
    config = LlamaConfig.from_pretrained(tiny_model, local_files_only=True, num_labels=1,
                                         pad_token_id=tokenizer.pad_token_id)
    config.architectures = ["LlamaForSequenceClassification"]
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    # A random head of std 0.02 gives scores too close together to tell samples apart.
    torch.nn.init.normal_(model.score.weight, std=1.0)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
