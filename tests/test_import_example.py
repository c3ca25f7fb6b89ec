"""Import of what diffusers' Custom Diffusion example writes: pytorch_custom_diffusion_weights.safetensors/.bin
(attention-processor weights) plus one <token>.safetensors/.bin per token, as a folder or as files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from customdiff.base import load_pipeline
from customdiff.cli import main
from customdiff.delta import apply_deltas, load_delta

PROMPT = "photo of a <new1> cat"


def _example_state(base: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Fine-tuned processor weights (full weights, keyed as unet.attn_processors' state) and a token row."""
    pipe = load_pipeline(base)
    g = torch.Generator().manual_seed(0)
    state = {}
    for n, p in pipe.unet.named_parameters():
        if n.endswith(("attn2.to_k.weight", "attn2.to_v.weight")):
            key = n.replace("attn2.to_k.", "attn2.processor.to_k_custom_diffusion.").replace(
                "attn2.to_v.", "attn2.processor.to_v_custom_diffusion.")
            state[key] = p.detach() + 0.05 * torch.randn(p.shape, generator=g)
    return state, torch.randn(32, generator=g)


def _write(folder, state, row, weights_ext: str, token_kind: str):
    folder.mkdir()
    if weights_ext == ".safetensors":
        save_file(state, str(folder / "pytorch_custom_diffusion_weights.safetensors"))
    else:
        torch.save(state, folder / "pytorch_custom_diffusion_weights.bin")
    if token_kind == "safetensors-as-bin":  # the example's safe_serialization: safetensors named <token>.bin
        save_file({"<new1>": row}, str(folder / "<new1>.bin"), metadata={"format": "pt"})
    elif token_kind == "pickle":
        torch.save({"<new1>": row}, folder / "<new1>.bin")
    else:
        save_file({"<new1>": row}, str(folder / "<new1>.safetensors"))
    (folder / "README.md").write_text("model card")
    torch.save({"step": torch.tensor(3)}, folder / "optimizer.bin")  # not a token file: skipped
    return folder


def _images(pipe):
    return pipe(PROMPT, num_inference_steps=3, guidance_scale=3.0, output_type="np",
                generator=torch.Generator("cpu").manual_seed(0)).images


@pytest.mark.parametrize("weights_ext,token_kind,given", [
    (".safetensors", "safetensors-as-bin", "folder"),
    (".safetensors", "safetensors", "weights file"),
    (".bin", "pickle", "files"),
])
def test_import_diffusers_example_output(tiny_base, tmp_path, weights_ext, token_kind, given):
    state, row = _example_state(tiny_base)
    folder = _write(tmp_path / "out", state, row, weights_ext, token_kind)
    weights = folder / f"pytorch_custom_diffusion_weights{weights_ext}"
    token_file = next(folder.glob("<new1>.*"))
    args = {"folder": [str(folder)], "weights file": [str(weights)], "files": [str(weights), str(token_file)]}[given]
    out = tmp_path / "imported.safetensors"
    assert main(["import", *args, "--base", tiny_base, "--class-word", "cat", "-o", str(out)]) == 0
    delta = load_delta(out)
    assert torch.equal(delta.tokens["<new1>"], row) and len(delta.param_names()) == len(state)

    pipe = load_pipeline(tiny_base)
    applied = apply_deltas(pipe, [delta])
    ours = _images(pipe)
    applied.remove()
    # the example's weights applied by hand: processor weights into to_k/to_v, the token added
    params = dict(pipe.unet.named_parameters())
    with torch.no_grad():
        for k, w in state.items():
            params[k.replace("processor.to_k_custom_diffusion", "to_k")
                   .replace("processor.to_v_custom_diffusion", "to_v")].copy_(w)
    pipe.tokenizer.add_tokens(["<new1>"])
    pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer))
    pipe.text_encoder.get_input_embeddings().weight.data[-1] = row
    assert np.abs(ours - _images(pipe)).max() < 1e-5


def test_import_example_refusals(tiny_base, tmp_path):
    state, row = _example_state(tiny_base)
    folder = _write(tmp_path / "out", state, row, ".safetensors", "safetensors")
    x = str(tmp_path / "x.safetensors")
    (tmp_path / "empty").mkdir()
    assert main(["import", str(tmp_path / "empty"), "--base", tiny_base, "-o", x]) == 2
    # a named token file must be one
    assert main(["import", str(folder / "pytorch_custom_diffusion_weights.safetensors"), str(folder / "optimizer.bin"),
                 "--base", tiny_base, "-o", x]) == 2
    assert main(["import", str(folder), str(folder), "--base", tiny_base, "-o", x]) == 2
    # a token file of another width
    save_file({"<new1>": torch.zeros(7)}, str(folder / "<new1>.safetensors"))
    assert main(["import", str(folder), "--base", tiny_base, "-o", x]) == 2
    assert not (tmp_path / "x.safetensors").exists()


def test_a_token_that_is_a_word_of_the_base_is_refused(tiny_base, tmp_path, capsys):
    """A token named "cat" would turn every "cat" (CLIP keeps it as "cat</w>"), even inside "cats", into its row."""
    from customdiff.base import load_pipeline
    from customdiff.tokens import in_vocabulary

    tok = load_pipeline(tiny_base).tokenizer
    assert "cat" not in tok.get_vocab() and in_vocabulary(tok, "cat") and not in_vocabulary(tok, "<new1>")
    state, row = _example_state(tiny_base)
    folder = tmp_path / "out"
    folder.mkdir()
    save_file(state, str(folder / "pytorch_custom_diffusion_weights.safetensors"))
    save_file({"cat": row}, str(folder / "cat.safetensors"))
    capsys.readouterr()
    assert main(["import", str(folder), "--base", tiny_base, "-o", str(tmp_path / "x.safetensors")]) == 2
    assert "token cat already exists in the base vocabulary" in capsys.readouterr().err


def test_a_token_file_this_user_may_not_read_is_refused_not_skipped(tiny_base, tmp_path, monkeypatch, capsys):
    """Found beside the weights, an unreadable `<new1>` file was skipped as "not a token file", and the delta was
    written without its token (exit 0). Root reads every file, so the refusal of the OS is simulated."""
    import builtins

    import customdiff.validate

    state, row = _example_state(tiny_base)
    folder = _write(tmp_path / "out", state, row, ".safetensors", "safetensors")
    locked = folder / "<new1>.safetensors"

    def guarded_open(file, *args, **kwargs):
        if Path(file) == locked:
            raise PermissionError(13, "Permission denied", str(file))
        return builtins.open(file, *args, **kwargs)

    monkeypatch.setattr(customdiff.validate, "open", guarded_open, raising=False)
    out = tmp_path / "x.safetensors"
    capsys.readouterr()
    assert main(["-q", "import", str(folder), "--base", tiny_base, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{locked}: permission denied: this user may not read it" in err[0], err
    assert not out.exists()
