"""A tiny random-weight T5 encoder and its tokenizer, shaped like SD3's text_encoder_3 / tokenizer_3.

`tiny_t5(folder)` writes a T5 tokenizer folder (backend.vocab.write_t5_tokenizer_folder: SentencePiece
Unigram, Precompiled nmt_nfkc charsmap, "</s>" appended, <pad> = 0) into `folder` and returns
(transformers T5EncoderModel, transformers T5TokenizerFast) built on it; the caller saves the model
(save_pretrained, or through a diffusers pipeline's save_pretrained).
"""
from __future__ import annotations

from pathlib import Path

from backend.vocab import write_t5_tokenizer_folder

WORDS = ("a photo of an astronaut riding horse on mars red green blue yellow circle square triangle "
         "large small at the top bottom left right center background painting cat dog the and with "
         "A The Photo").split()


def tiny_t5(folder, d_model: int = 32, seed: int = 4, feed_forward_proj: str = "gated-gelu"):
    """(torch T5EncoderModel in eval mode, T5TokenizerFast): vocab = the tokenizer's, 2 layers of 4 heads x 8,
    d_ff 37, 8 position buckets up to distance 16; layer norm weights perturbed so they matter."""
    import torch
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast
    folder = Path(folder)
    write_t5_tokenizer_folder(folder, WORDS)
    tokenizer = T5TokenizerFast.from_pretrained(str(folder))
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, relative_attention_max_distance=16,
                      feed_forward_proj=feed_forward_proj, layer_norm_epsilon=1e-6, dropout_rate=0.0,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      decoder_start_token_id=tokenizer.pad_token_id)
    model = T5EncoderModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model, tokenizer
