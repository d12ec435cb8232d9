"""Model sources: local directory, hub id (mocked: tests never reach the hub), and bad paths."""

from __future__ import annotations

from pathlib import Path

import pytest

import carve


def test_local_directory_loads_with_fingerprint(model_dir: Path) -> None:
    lm = carve.load_model(str(model_dir))
    assert lm.source == str(model_dir) and len(lm.fingerprint) == 16
    assert lm.fingerprint == carve.load_model(str(model_dir)).fingerprint
    assert lm.model.dtype.is_floating_point and lm.tokenizer.pad_token_id is not None


def test_fingerprint_reads_every_byte_and_remembers_large_files(monkeypatch, tmp_path: Path) -> None:
    """Two weight files equal in name, size and their first and last MiB but one byte apart in the
    middle (a fine-tune that left the embeddings and the last block frozen) get different
    fingerprints; a large file's hash is remembered by its path, size and time once the file is
    over 2 s old, and read anew once the file changes."""
    import hashlib
    import os

    from carve.models import load
    from carve.output import cache_dir

    data = bytearray(os.urandom(6 << 20))
    a, b = tmp_path / "a" / "model.safetensors", tmp_path / "b" / "model.safetensors"
    for path in (a, b):
        path.parent.mkdir()
        path.write_bytes(bytes(data))
    assert load.file_fingerprint([a]) == load.file_fingerprint([b])
    data[3 << 20] ^= 1
    b.write_bytes(bytes(data))
    assert load.file_fingerprint([a]) != load.file_fingerprint([b])
    assert load.content_hash(b) == hashlib.sha256(bytes(data)).hexdigest()
    assert not (cache_dir() / "hashes").exists()  # 6 MiB: read every time, nothing remembered

    monkeypatch.setattr(load, "_MEMO_FROM_BYTES", 1 << 20)
    assert load.content_hash(a) and not (cache_dir() / "hashes").exists()  # written just now: not yet
    old = a.stat().st_mtime_ns - 10**10
    os.utime(a, ns=(old, old))
    truth = load.content_hash(a)
    (memo,) = (cache_dir() / "hashes").glob("*.json")
    forged = memo.read_text().replace(truth, "f" * 64)
    memo.write_text(forged)
    assert load.content_hash(a) == "f" * 64  # the remembered hash is what a second call returns
    os.utime(a, ns=(old + 1, old + 1))
    assert load.content_hash(a) == truth  # a changed time is another version: read again


def test_hub_id_goes_to_from_pretrained(monkeypatch, model_dir: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    asked: list[str] = []
    real_model, real_tok = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained
    real_config = AutoConfig.from_pretrained

    def fake_model(name: str, **kw: object) -> object:
        asked.append(name)
        return real_model(model_dir, **kw)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda name, **kw: real_tok(model_dir))
    monkeypatch.setattr(AutoConfig, "from_pretrained", lambda name, **kw: real_config(model_dir, **kw))
    lm = carve.load_model("some-org/some-model")
    assert asked == ["some-org/some-model"] and lm.source == "some-org/some-model"


def test_unreachable_hub_id_is_a_usage_error(monkeypatch) -> None:
    from transformers import AutoTokenizer

    def offline(name: str, **kw: object) -> object:
        raise OSError(f"We couldn't connect to the hub to load {name}")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(
        carve.UsageError, match="no local path 'org/missing', and no hub model of that id could be loaded"
    ):
        carve.load_model("org/missing")


def test_directory_without_config(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    with pytest.raises(carve.UsageError, match=r"has no config\.json"):
        carve.load_model(str(tmp_path / "m"))


def test_bad_device_and_dtype(model_dir: Path) -> None:
    with pytest.raises(carve.UsageError, match="unknown dtype"):
        carve.load_model(str(model_dir), dtype="int3")
    with pytest.raises(carve.UsageError, match="unknown device"):
        carve.load_model(str(model_dir), device="tpu")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_gguf_is_dequantized_once_then_read_from_the_cache(
    monkeypatch, tmp_path: Path, model_dir: Path, dtype: str
) -> None:
    """The second load of a .gguf file reads carve's cached copy: the same weights bit for bit,
        fingerprint, source precision, tokens and config; a damaged copy (a bit flipped: its checksum; cut
    short) is read from the GGUF anew."""
    import torch

    from carve.cli.main import main
    from carve.models import load
    from carve.output import cache_dir

    gguf = tmp_path / "m.gguf"
    assert main(["export", str(model_dir), "--gguf", str(gguf), "--type", "q8_0"]) == 0
    reads: list[Path] = []
    read = load._read_gguf

    def counted(path: Path, *args):
        reads.append(path)
        return read(path, *args)

    monkeypatch.setattr(load, "_read_gguf", counted)
    first = carve.load_model(str(gguf), dtype=dtype)
    second = carve.load_model(str(gguf), dtype=dtype)
    assert len(reads) == 1
    entries = [p for p in (cache_dir() / "models").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and dtype in entries[0].name
    a, b = first.model.state_dict(), second.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype == getattr(torch, dtype) and torch.equal(a[k], b[k]), k
    assert (first.fingerprint, first.source_dtype) == (second.fingerprint, second.source_dtype)
    text = "Section 12(b) of the 2019 Act, as amended: 345 days."
    assert first.tokenizer(text).input_ids == second.tokenizer(text).input_ids
    assert first.tokenizer.eos_token_id == second.tokenizer.eos_token_id
    skip = {"_name_or_path", "transformers_version"}
    assert {k: v for k, v in first.model.config.to_dict().items() if k not in skip} == {
        k: v for k, v in second.model.config.to_dict().items() if k not in skip
    }
    # one bit of the cached weights flipped (size and header intact): its checksum sends the load back to
    # the GGUF, which rewrites the entry
    weights = entries[0] / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    flipped = carve.load_model(str(gguf), dtype=dtype)
    assert len(reads) == 2 and all(torch.equal(v, a[k]) for k, v in flipped.model.state_dict().items())
    # a damaged cached file: the GGUF is read again and the entry rewritten
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    third = carve.load_model(str(gguf), dtype=dtype)
    assert len(reads) == 3 and torch.equal(third.model.lm_head.weight, first.model.lm_head.weight)
    assert weights.stat().st_size > 0 and carve.load_model(str(gguf), dtype=dtype) and len(reads) == 3
    # carve's reading of a GGUF changed (its pre-tokenizer rules): the file is read anew
    from carve.models import pretokenize

    changed = tmp_path / "pretokenize.py"
    changed.write_bytes(Path(pretokenize.__file__).read_bytes() + b"\n# a rule changed\n")
    monkeypatch.setattr(pretokenize, "__file__", str(changed))
    carve.load_model(str(gguf), dtype=dtype)
    assert len(reads) == 4 and len([p for p in (cache_dir() / "models").iterdir() if not p.name.startswith(".")]) == 2


def _mxfp4_gpt_oss(directory: Path, tokenizer) -> None:
    """A tiny gpt-oss checkpoint as OpenAI ships gpt-oss: its experts in MXFP4 (`*_blocks`: 4-bit
    values two to a byte, 32 to a block; `*_scales`: one power-of-two exponent a block), the rest in
    bfloat16, and a `quantization_config` saying so."""
    import json

    import torch
    import transformers as tf
    from safetensors.torch import save_file

    from tests.conftest import VOCAB

    config = tf.GptOssConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                             num_experts_per_tok=2, sliding_window=16, max_position_embeddings=256,
                             pad_token_id=None, bos_token_id=None, eos_token_id=None)  # fmt: skip
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config)
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, w in model.state_dict().items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):  # [E, in, out] stored [E, out, in/32, 16]
            e, n_in, n_out = w.shape
            state[name + "_blocks"] = torch.randint(0, 256, (e, n_out, n_in // 32, 16), dtype=torch.uint8, generator=g)
            state[name + "_scales"] = torch.randint(122, 127, (e, n_out, n_in // 32), dtype=torch.uint8, generator=g)
        else:
            state[name] = w.to(torch.bfloat16).contiguous()
    directory.mkdir()
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    saved = {**config.to_dict(), "architectures": ["GptOssForCausalLM"], "dtype": "bfloat16",
             "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [
                 "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}}  # fmt: skip
    (directory / "config.json").write_text(json.dumps(saved))
    tokenizer.save_pretrained(directory)


def test_a_quantized_checkpoint_is_extracted_as_plain_floats(tmp_path: Path, tokenizer, small_corpus: Path,
                                                            capsys) -> None:  # fmt: skip
    """A quantized checkpoint transformers de-quantizes on load (gpt-oss's MXFP4 experts, on CPU) is
    extracted as a float model, and saved under the model's own parameter names: stock
    from_pretrained reads back the de-quantized experts with the mask applied (transformers itself
    would save them as `gate_up_proj_blocks`, which loads as missing experts, randomly initialized).
    Streamed, each MXFP4 pair is de-quantized as its block is read: the same weights and masks bit for
    bit, and the same GGUF export.  Another quantization is refused by --stream with one line."""
    import json

    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from carve.cli.main import main

    src, out = tmp_path / "gpt-oss-mxfp4", tmp_path / "out"
    _mxfp4_gpt_oss(src, tokenizer)
    data = [str(src), "--domain", str(small_corpus), "--general", str(small_corpus), "--calib-blocks", "4",
            "--block-len", "32", "--eval-blocks", "2", "--quiet", "--no-speed", "--cloze-items", "0"]  # fmt: skip
    assert main(["extract", *data, "--method", "magnitude", "--out", str(out)]) == 0
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert not any(k.endswith(("_blocks", "_scales")) for k in f.keys())
    reloaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        for i in range(2):
            p = f"model.layers.{i}.mlp.experts."
            for proj in ("gate_up_proj", "down_proj"):
                want = convert_moe_packed_tensors(
                    f.get_tensor(p + proj + "_blocks"), f.get_tensor(p + proj + "_scales")
                )
                got = reloaded[p + proj]
                kept = got != 0
                assert 0.4 < kept.float().mean() < 0.6  # pruned, and not left random
                assert torch.equal(got[kept].float(), want[kept].float())
    from carve.export import export

    whole = export(src, tmp_path / "whole.gguf", "q8_0", stream=False)
    assert "streamed" not in whole
    assert export(src, tmp_path / "st.gguf", "q8_0", stream=True)["streamed"] == "--stream"
    assert (tmp_path / "st.gguf").read_bytes() == (tmp_path / "whole.gguf").read_bytes()
    st = tmp_path / "st"
    assert main(["extract", *data, "--method", "magnitude", "--stream", "--out", str(st)]) == 0
    assert "quantization_config" not in json.loads((st / "config.json").read_text())
    for weights in ("model.safetensors", "mask.safetensors"):
        with safe_open(str(out / weights), "pt") as a, safe_open(str(st / weights), "pt") as b:
            assert sorted(a.keys()) == sorted(b.keys())
            assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"]["quant_method"] = "fp8"
    (src / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert main(["extract", *data, "--method", "magnitude", "--stream", "--out", str(tmp_path / "fp8")]) == 2
    err = capsys.readouterr().err
    assert "is quantized (fp8)" in err and err.count("\n") == 1 and not (tmp_path / "fp8").exists()


def test_mxfp4_values_against_transformers_and_by_hand() -> None:
    """MXFP4 de-quantization: each byte's low nibble, then its high one, as e2m1 values times the
    block's power of two, laid out [..., in, out]; the same bits as transformers' own de-quantizer."""
    import torch
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from carve.models.stream import FP4_VALUES, mxfp4_values

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 5, 2, 16), dtype=torch.uint8, generator=g)  # 3 experts, 5 out, 64 in
    scales = torch.randint(120, 135, (3, 5, 2), dtype=torch.uint8, generator=g)
    got = mxfp4_values(blocks, scales)
    assert got.shape == (3, 64, 5) and got.dtype == torch.bfloat16
    assert torch.equal(got, convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16))
    e, o, i = 2, 4, 37  # input 37: block 1, byte 2, high nibble
    byte, scale = int(blocks[e, o, 1, 2]), int(scales[e, o, 1])
    assert got[e, i, o].item() == FP4_VALUES[byte >> 4] * 2.0 ** (scale - 127)
    with pytest.raises(carve.UsageError, match="do not pair up"):
        mxfp4_values(blocks, scales[:, :, :1])


def _as_gguf(tok, tmp_path: Path, name: str, model_type: str = "llama") -> tuple[Path, dict]:
    """`tok` on a tiny random model of `model_type`, written by `carve export`: the GGUF and its header."""
    import transformers as tf

    from carve.cli.main import main
    from carve.models.gguf_header import read_gguf_header

    src = tmp_path / name
    config = tf.AutoConfig.for_model(model_type, vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(src)
    tok.save_pretrained(src)
    gguf = tmp_path / f"{name}.gguf"
    assert main(["export", str(src), "--gguf", str(gguf), "--quiet"]) == 0
    return gguf, read_gguf_header(gguf)


def test_gguf_tokenizer_restores_what_transformers_leaves_out(tmp_path: Path) -> None:
    """carve's tokenizer of a GGUF (`gguf_tokenizer`) tokenizes as the model's own tokenizer where
    transformers' GGUF reader alone does not (found on llama.cpp's real vocabularies,
    bench/real_tokenizers.py): SentencePiece's dummy prefix before text that starts with a space (Llama 2),
    a word the vocabulary holds whole as one token (Llama 3's ignore_merges), special tokens spelled
    outside ASCII at their own ids (DeepSeek's); and a tokenizer whose class would rebuild another split
    rule on loading a saved copy is kept under the generic class, in carve's cache too."""
    import json

    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from carve.models.pretokenize import SPLITS, gguf_tokenizer
    from tests.conftest import byte_level_tokenizer, gemma_style_tokenizer

    def plain(gguf: Path):  # transformers' GGUF reader alone
        return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)

    # Llama 2: "▁" before every text, even one that starts with a space
    backend = gemma_style_tokenizer().backend_tokenizer
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])  # fmt: skip
    llama2 = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")
    gguf, header = _as_gguf(llama2, tmp_path, "llama2")
    texts = [" The parties agree.", "  two spaces", "The licence is granted.", " é 😀"]
    want = [llama2(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert [gguf_tokenizer(gguf, header)(t, add_special_tokens=False)["input_ids"] for t in texts] == want
    assert [plain(gguf)(t, add_special_tokens=False)["input_ids"] for t in texts] != want

    # Llama 3: a token the vocabulary holds whole, no merge reaching it
    data = json.loads(byte_level_tokenizer(next(k for k, v in SPLITS.items() if v == "llama-bpe")).backend_tokenizer
                      .to_str())  # fmt: skip
    data["model"]["vocab"]["Ġzqxj"] = max(data["model"]["vocab"].values()) + 1
    data["model"]["ignore_merges"] = True
    llama3 = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)), eos_token="<eos>")
    gguf, header = _as_gguf(llama3, tmp_path, "llama3")
    assert header["tokenizer.ggml.pre"] == "llama-bpe"
    assert len(llama3(" zqxj")["input_ids"]) == 1
    assert gguf_tokenizer(gguf, header)(" zqxj")["input_ids"] == llama3(" zqxj")["input_ids"]
    assert len(plain(gguf)(" zqxj")["input_ids"]) > 1

    # DeepSeek's special tokens, spelled outside ASCII: transformers' reader garbles them at their ids and adds them
    # again past the vocabulary (BOS and EOS without an embedding row: the model was refused); carve puts them back
    deepseek = byte_level_tokenizer(None)
    deepseek.add_special_tokens({"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>"})
    gguf, header = _as_gguf(deepseek, tmp_path, "deepseek")
    assert plain(gguf).bos_token_id >= len(deepseek)
    read = gguf_tokenizer(gguf, header)
    assert (read.bos_token_id, read.eos_token_id) == (deepseek.bos_token_id, deepseek.eos_token_id)
    text = "<｜begin▁of▁sentence｜>The parties agree.<｜end▁of▁sentence｜>"
    assert read(text, add_special_tokens=False)["input_ids"] == deepseek(text, add_special_tokens=False)["input_ids"]

    # a Qwen2 GGUF with Qwen3.5's rule: transformers reads it as a Qwen2Tokenizer, whose saved copy loads with
    # Qwen2's rule; carve reads it with the file's rule, from the GGUF and from its cache alike
    import transformers as tf

    from carve.export import write_gguf
    from carve.models.load import LoadedModel, load_model

    qwen35 = byte_level_tokenizer(next(k for k, v in SPLITS.items() if v == "qwen35"))
    qwen35.add_special_tokens({"eos_token": "<｜end▁of▁sentence｜>"})  # as DeepSeek-R1-Distill-Qwen's: both fixes
    config = tf.Qwen2Config(vocab_size=len(qwen35), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    gguf = tmp_path / "qwen2-with-qwen35-rule.gguf"
    write_gguf(LoadedModel(tf.AutoModelForCausalLM.from_config(config), qwen35, "tiny", ""), gguf, "f16")
    assert type(plain(gguf)).__name__ == "Qwen2Tokenizer"
    rules = [json.loads(load_model(str(gguf)).tokenizer.backend_tokenizer.to_str())["pre_tokenizer"] for _ in range(2)]
    assert rules[0] == rules[1] and "\\p{M}" in json.dumps(rules[0])  # read, then from the cache
    assert load_model(str(gguf)).tokenizer.eos_token_id == qwen35.eos_token_id
    assert isinstance(load_model(str(gguf)).tokenizer.backend_tokenizer.pre_tokenizer, pre_tokenizers.Sequence)
