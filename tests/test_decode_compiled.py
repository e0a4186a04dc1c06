"""The decode step compiled with ``torch.compile`` (``embscale decode-bench --compile``) decodes as the eager step:
the same greedy tokens, the same logits and caches (float32, to 1e-4: Inductor reorders the sums); compiled on one
decoder, it runs on another of the same shapes without compiling again (what the CUDA graph's warm-up on a spare
decoder needs). On the CPU here (Inductor's C++ backend); the graphed and compiled step on CUDA is in
test_decode_cuda_graph.py."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from embscale.cli import main
from embscale.inference.decode import Decoder, compiled_decode_forward, decode_forward
from embscale.models.config import ModelConfig
from embscale.models.model import build_model

EOS = 3
MODEL = dict(vocab_size=512, d_model=64, n_layers=1, n_heads=4, layer_type="shortcut", dense_hidden=128,
             n_experts=8, n_zero_experts=4, top_k=2, expert_hidden=64, eos_token_id=EOS, max_seq_len=128,
             attention="mla", mla=dict(q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16,
                                       v_head_dim=16),
             ngram=dict(n=3, k=2, ratio=2.0),
             per_layer=dict(kind="plne", targets="first", ngram=dict(n=2, k=2, ratio=1.5)))


# the command's test: a smaller model (compiling is most of these tests' time)
SMALL = dict(vocab_size=97, d_model=24, n_layers=1, n_heads=2, layer_type="standard", dense_hidden=24, n_experts=6,
             top_k=2, expert_hidden=8, eos_token_id=3, ngram=dict(n=3, k=2, ratio=2.0))


def test_compiled_decoding_equals_eager_decoding_and_compiles_once():
    torch._dynamo.reset()
    cfg = ModelConfig.from_dict(MODEL)
    torch.manual_seed(0)
    model = build_model(cfg).eval()  # float32: a wrong step shows, roundings do not
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(4, 512, (n,), generator=generator) for n in (5, 9, 2)]
    prompts[1][4] = EOS  # a prompt that crosses a document boundary
    step = compiled_decode_forward()

    spare = Decoder(model, 3, 30)  # compiled here, as the CUDA graph's warm-up does
    spare.kv.check_capacity = False
    with torch.no_grad():
        for _ in range(3):
            step(spare, torch.randint(4, 512, (3, 1), generator=generator))
            spare.rollback(1)

    def decode(forward) -> tuple[torch.Tensor, torch.Tensor, Decoder]:
        decoder = Decoder(model, len(prompts), 30)
        tokens, logits = [], []
        with torch.no_grad():
            token = decoder.prefill(prompts).argmax(-1)
            decoder.kv.check_capacity = False
            for i in range(10):
                if i == 4:
                    token = torch.full_like(token, EOS)  # the N-gram Cache restarts after an EOS
                out, _ = forward(decoder, token.unsqueeze(1))
                token = out[:, -1].argmax(-1)
                tokens.append(token)
                logits.append(out.float())
        return torch.stack(tokens), torch.stack(logits), decoder

    eager_tokens, eager_logits, eager = decode(decode_forward)
    with torch._dynamo.config.patch(error_on_recompile=True):  # the real decoder reuses the spare's code
        compiled_tokens, compiled_logits, compiled = decode(step)
    assert torch.equal(compiled_tokens, eager_tokens)
    torch.testing.assert_close(compiled_logits, eager_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(compiled.lengths, eager.lengths)
    for role, cache in eager.ngrams.caches.items():
        assert torch.equal(compiled.ngrams.caches[role].history, cache.history), role
    for mine, theirs in zip(compiled.kv.all(), eager.kv.all(), strict=True):
        for name, buffer in theirs.buffers.items():
            torch.testing.assert_close(mine.buffers[name], buffer, rtol=1e-4, atol=1e-4)


def test_decode_bench_compile_flag_marks_its_rows(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EMBSCALE_PROGRESS", "off")
    config = tmp_path / "model.yaml"
    config.write_text(yaml.safe_dump(SMALL))
    assert main(["decode-bench", str(config), "--batch-sizes", "2", "--prompt-len", "5", "--new-tokens", "4",
                 "--k", "2", "--copy-mib", "4", "--compile", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["compile"] is True
    rows = report["models"][0]["rows"]
    assert [(row["mode"], row["compiled"], row["cuda_graph"]) for row in rows] == [("decode", True, False),
                                                                                   ("speculative", True, False)]
    for row in rows:
        assert row["tokens_per_s"] > 0 and row["ms_per_step"] > 0 and 1 <= row["experts_per_step"] <= 6


@pytest.mark.parametrize("flag", [["--compile", "yes"]])
def test_decode_bench_compile_takes_no_value(flag, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["decode-bench", "bench_ne_100m", *flag])
    assert exit_info.value.code == 2


def test_compiled_speculative_rounds_emit_the_greedy_tokens():
    """Greedy speculative decoding with its fixed-shape feeds compiled (the draft's single tokens on the plain
    embedding, the verification pass) emits exactly greedy decoding's tokens, in the uncompiled rounds."""
    from embscale.inference.decode import generate
    from embscale.inference.speculative import speculative_generate

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_dict(SMALL)).eval()
    generator = torch.Generator().manual_seed(2)
    prompts = [torch.randint(4, 97, (n,), generator=generator) for n in (6, 3, 9)]
    greedy = generate(model, prompts, 10)
    eager, eager_stats = speculative_generate(model, prompts, 10, k=3)
    compiled, compiled_stats = speculative_generate(model, prompts, 10, k=3, compile=True)
    assert torch.equal(eager, greedy) and torch.equal(compiled, greedy)
    assert (compiled_stats.rounds, compiled_stats.accepted) == (eager_stats.rounds, eager_stats.accepted)
