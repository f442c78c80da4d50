"""Methods added to vLLM's workers (`worker_extension_cls`), called by name through `LLM.collective_rpc`.

By name rather than as a pickled function, so the call works in-process (CPU) and
across vLLM's worker processes (GPU) alike. Kept free of Ray and of our other
modules: vLLM imports it inside its workers.
"""

from __future__ import annotations


class EngineExtension:
    def reseed(self, seed: int) -> None:
        """Put the worker's random state where a fresh engine with `seed` starts sampling.

        A fresh worker seeds in `init_device` and again after warm-up with this same call;
        requests without a seed of their own (ours: per-request seeds fail on CPU) draw
        from that state.
        """
        from vllm.utils.torch_utils import set_random_seed

        set_random_seed(seed)

    def retie_lm_head(self) -> bool:
        """After `reload_weights`: tie the output layer to the reloaded input embeddings again.

        A tied checkpoint has no `lm_head.weight`, so vLLM 0.32's layerwise reload rebuilds
        the embeddings and puts the output layer's old tensors back ("ParallelLMHead: Failed
        to load weights"): a reloaded engine would score tokens with the previous policy's
        output layer. Re-tying and rerunning the layer's post-load step (on CPU it packs the
        weight for its GEMM) gives the output layer a fresh engine has. False for an untied model,
        and for one whose logits read the input embeddings directly (Gemma).
        """
        model = self.model_runner.get_model()
        if not getattr(self.model_runner.model_config.hf_text_config, "tie_word_embeddings", False):
            return False
        lm_head = getattr(model, "lm_head", None)
        embed_tokens = getattr(getattr(model, "model", None), "embed_tokens", None)
        if lm_head is None and embed_tokens is not None:
            # Gemma's vLLM classes have no output layer: their logits read embed_tokens itself,
            # which the reload rebuilt (tests/test_model_families.py checks the log-probs).
            return False
        if lm_head is None or embed_tokens is None:
            raise RuntimeError(f"{type(model).__name__} ties its embeddings but has no lm_head and "
                               "model.embed_tokens to tie again after a reload; set generate.keep_engines=off")
        lm_head.tie_weights(embed_tokens)
        lm_head.quant_method.process_weights_after_loading(lm_head)
        return True
