"""A tiny random-weight llama GGUF (2 layers, 512 tokens of vocabulary), with a chat template
when asked: the default model is a base model without one, and chat formatting through a
model's own template must be tested for real. Its text is noise; its prompt sizes are not."""

from __future__ import annotations

from pathlib import Path

#: a Zephyr-like template: each turn in role markers, closed by the end-of-sequence text
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def write_tiny_model(path: Path, chat_template: str | None = None, hidden: int = 64, layers: int = 2) -> Path:
    import gguf
    import numpy as np

    vocab, heads = 512, 4
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-random-llama")
    writer.add_context_length(2048)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(hidden * 2)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tokens += [f"\u2581t{i}" for i in range(vocab - len(tokens))]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * (vocab - 259))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    if chat_template:
        writer.add_chat_template(chat_template)
    rng = np.random.default_rng(0)

    def matrix(name: str, rows: int, cols: int) -> None:
        writer.add_tensor(name, (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32))

    def norm(name: str) -> None:
        writer.add_tensor(name, np.ones(hidden, dtype=np.float32))

    matrix("token_embd.weight", vocab, hidden)
    norm("output_norm.weight")
    matrix("output.weight", vocab, hidden)
    for i in range(layers):
        block = f"blk.{i}."
        norm(block + "attn_norm.weight")
        norm(block + "ffn_norm.weight")
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            matrix(block + name + ".weight", hidden, hidden)
        matrix(block + "ffn_gate.weight", hidden * 2, hidden)
        matrix(block + "ffn_up.weight", hidden * 2, hidden)
        matrix(block + "ffn_down.weight", hidden, hidden * 2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
