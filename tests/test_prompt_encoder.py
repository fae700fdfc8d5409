"""Prompt strings to embeddings (maskfleet/prompt_encoder.py) with a tiny CLIP made on the spot."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from maskfleet.prompt_encoder import PromptEncoder, has_text_encoder
from maskfleet.sampling.errors import InvalidInput
from maskfleet.model_dirs import load_unet_denoiser

GOLDEN_UNET = Path(__file__).parent / "data" / "golden" / "tiny_unet"
LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789"
MERGES = ["c a", "ca t</w>", "d o", "do g</w>"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def write_bpe_files(folder: Path) -> None:
    """A CLIP BPE vocabulary of single characters and two merged words, as SD1.5 ships it."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in LETTERS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    for merge in MERGES:
        vocab[merge.replace(" ", "")] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}))


def make_model_dir(root: Path, tokenizer_layout: str = "bpe") -> Path:
    """A diffusers pipeline directory: the golden tiny UNet + a tiny CLIP text encoder."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    model_dir = root / "tiny"
    shutil.copytree(GOLDEN_UNET, model_dir / "unet")
    write_bpe_files(root / "bpe")
    if tokenizer_layout == "bpe":  # vocab.json + merges.txt, as SD1.5's tokenizer/ holds
        write_bpe_files(model_dir / "tokenizer")
    else:  # what save_pretrained writes (tokenizer.json)
        CLIPTokenizer.from_pretrained(root / "bpe", local_files_only=True).save_pretrained(model_dir / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(model_dir / "tokenizer", local_files_only=True)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    torch.manual_seed(0)
    CLIPTextModel(config).save_pretrained(model_dir / "text_encoder", safe_serialization=True)
    return model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("models"))


def direct_encoding(model_dir: Path, text: str) -> torch.Tensor:
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(model_dir / "tokenizer", local_files_only=True)
    model = CLIPTextModel.from_pretrained(model_dir / "text_encoder", use_safetensors=True, local_files_only=True)
    ids = tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).last_hidden_state


def test_model_dir_detection(model_dir, tmp_path):
    assert has_text_encoder(model_dir)
    assert not has_text_encoder(GOLDEN_UNET)
    assert not has_text_encoder(tmp_path)


def test_encodes_prompts_like_a_direct_call_of_the_text_model(model_dir):
    encoder = PromptEncoder()
    cat = encoder.encode(model_dir, "a cat")
    dog = encoder.encode(model_dir, "a dog")
    assert cat.shape == dog.shape == (1, 77, 32)
    assert cat.dtype == torch.float32 and cat.device.type == "cpu"
    assert not torch.allclose(cat, dog)
    torch.testing.assert_close(cat, direct_encoding(model_dir, "a cat"), rtol=0, atol=0)
    torch.testing.assert_close(dog, direct_encoding(model_dir, "a dog"), rtol=0, atol=0)


def test_same_prompt_twice_is_a_cache_hit(model_dir):
    encoder = PromptEncoder()
    first = encoder.encode(model_dir, "a cat")
    again = encoder.encode(model_dir, "a cat")
    assert again is first
    assert (encoder.hits, encoder.misses) == (1, 1)
    encoder.encode(model_dir, "a dog")
    assert (encoder.hits, encoder.misses) == (1, 2)
    # the text encoder was loaded once for both prompts
    assert (encoder.encoders.misses, encoder.encoders.hits) == (1, 1)


def test_encoding_cache_is_bounded_lru(model_dir):
    encoder = PromptEncoder(max_prompts=2)
    cat = encoder.encode(model_dir, "a cat")
    encoder.encode(model_dir, "a dog")
    assert encoder.encode(model_dir, "a cat") is cat  # cat becomes most recent
    encoder.encode(model_dir, "cat and dog")  # evicts "a dog"
    assert encoder.encode(model_dir, "a cat") is cat
    misses = encoder.misses
    encoder.encode(model_dir, "a dog")
    assert encoder.misses == misses + 1


def test_zero_bound_caches_no_encodings(model_dir):
    encoder = PromptEncoder(max_prompts=0)
    first = encoder.encode(model_dir, "a cat")
    second = encoder.encode(model_dir, "a cat")
    assert first is not second and torch.equal(first, second)
    assert encoder.hits == 0


def test_prompt_cache_size_from_environment(monkeypatch):
    monkeypatch.setenv("MASKFLEET_PROMPT_CACHE_SIZE", "7")
    assert PromptEncoder().max_prompts == 7
    monkeypatch.setenv("MASKFLEET_PROMPT_CACHE_SIZE", "many")
    with pytest.raises(ValueError, match="MASKFLEET_PROMPT_CACHE_SIZE=.many.: expected a whole number"):
        PromptEncoder()


def test_long_prompts_are_truncated_to_77_tokens(model_dir):
    encoder = PromptEncoder()
    long = " ".join(["cat"] * 200)
    embeds = encoder.encode(model_dir, long)
    assert embeds.shape == (1, 77, 32)
    # the 76 tokens after the start token are "cat" then EOS at the end either way
    assert torch.equal(embeds, encoder.encode(model_dir, " ".join(["cat"] * 100)))


def test_tokenizer_json_layout_gives_the_same_embeddings(tmp_path, model_dir):
    other = make_model_dir(tmp_path, tokenizer_layout="tokenizer.json")
    assert (other / "tokenizer" / "tokenizer.json").is_file()
    encoder = PromptEncoder()
    torch.testing.assert_close(encoder.encode(other, "a cat"), encoder.encode(model_dir, "a cat"), rtol=0, atol=0)


def test_half_precision_encoder(model_dir):
    embeds = PromptEncoder(dtype=torch.bfloat16).encode(model_dir, "a cat")
    assert embeds.dtype == torch.bfloat16
    torch.testing.assert_close(embeds.float(), direct_encoding(model_dir, "a cat"), rtol=0.05, atol=0.05)


def test_model_without_text_encoder_is_rejected(tmp_path):
    shutil.copytree(GOLDEN_UNET, tmp_path / "bare")
    with pytest.raises(InvalidInput, match="no text_encoder/ and tokenizer/") as info:
        PromptEncoder().encode(tmp_path / "bare", "a cat", field="base_sampler.positive")
    assert info.value.field == "base_sampler.positive"


def test_non_string_prompt_is_rejected(model_dir):
    with pytest.raises(InvalidInput, match="must be a string, got list"):
        PromptEncoder().encode(model_dir, ["a cat"])


def test_pickle_text_encoder_is_not_loaded(tmp_path, model_dir):
    """Only safetensors weights are read: a text encoder with pytorch_model.bin alone fails."""
    from safetensors.torch import load_file

    other = tmp_path / "pickled"
    shutil.copytree(model_dir, other)
    weights = other / "text_encoder" / "model.safetensors"
    torch.save(load_file(weights), other / "text_encoder" / "pytorch_model.bin")
    weights.unlink()
    with pytest.raises(OSError, match="model.safetensors"):
        PromptEncoder().encode(other, "a cat")


def test_embeddings_drive_the_unet(model_dir):
    """The encodings have the width the tiny UNet's cross-attention takes."""
    denoiser = load_unet_denoiser(model_dir)
    embeds = PromptEncoder().encode(model_dir, "a cat")
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = denoiser.denoise(x, torch.tensor(1.0), embeds)
    other = denoiser.denoise(x, torch.tensor(1.0), PromptEncoder().encode(model_dir, "a dog"))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, other)


def make_sdxl_model_dir(root: Path) -> Path:
    """The SDXL-style golden UNet (context 32, pooled 48) with two tiny text encoders as SDXL ships them:
    CLIP (16 wide) and a CLIP with projection (16 wide, projected to 48) whose widths add up to 32."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    model_dir = root / "tiny-xl"
    shutil.copytree(GOLDEN_UNET.parent / "tiny_unet_xl", model_dir)
    for folder in ("tokenizer", "tokenizer_2"):
        write_bpe_files(model_dir / folder)
    tokenizer = CLIPTokenizer.from_pretrained(model_dir / "tokenizer", local_files_only=True)
    common = dict(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=37,
                  max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(1)
    CLIPTextModel(CLIPTextConfig(**common)).save_pretrained(model_dir / "text_encoder", safe_serialization=True)
    CLIPTextModelWithProjection(CLIPTextConfig(**common, projection_dim=48)).save_pretrained(
        model_dir / "text_encoder_2", safe_serialization=True)
    return model_dir


def direct_sdxl_encoding(model_dir: Path, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """What an SDXL pipeline computes: both penultimate hidden states side by side, the second's text_embeds."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    outs = []
    for tok, enc, cls in (("tokenizer", "text_encoder", CLIPTextModel), ("tokenizer_2", "text_encoder_2", CLIPTextModelWithProjection)):
        tokenizer = CLIPTokenizer.from_pretrained(model_dir / tok, local_files_only=True)
        ids = tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            outs.append(cls.from_pretrained(model_dir / enc, use_safetensors=True, local_files_only=True)(ids, output_hidden_states=True))
    return torch.cat([outs[0].hidden_states[-2], outs[1].hidden_states[-2]], dim=-1), outs[1].text_embeds


def test_one_encoder_gives_no_pooled_embedding(model_dir):
    assert PromptEncoder().encode_with_pooled(model_dir, "a cat")[1] is None


def test_sdxl_prompts_use_both_encoders_and_the_projected_pooled_embedding(tmp_path):
    model_dir = make_sdxl_model_dir(tmp_path)
    embeds, pooled = PromptEncoder().encode_with_pooled(model_dir, "a cat")
    want_embeds, want_pooled = direct_sdxl_encoding(model_dir, "a cat")
    assert embeds.shape == (1, 77, 32) and pooled.shape == (1, 48)
    assert torch.equal(embeds, want_embeds) and torch.equal(pooled, want_pooled)



def test_an_sdxl_job_with_text_prompts_equals_the_job_with_their_embedding_files(tmp_path):
    """Bitwise, through `maskfleet run`'s pipeline: text prompts encoded on the worker, or the same
    encodings sent as files (size conditioning given both ways for one of them)."""
    from safetensors.torch import load_file, save_file

    from golden_jobs import IN_REPO_GOLDEN, write_case_job
    from maskfleet.job import parse_job
    from maskfleet.job_pipeline import RunOptions, run_job

    models = tmp_path / "models"
    models.mkdir()
    model_dir = make_sdxl_model_dir(models)
    job_path, _, _ = write_case_job(IN_REPO_GOLDEN / "cases" / "p03_sdxl_euler_karras_o3", tmp_path / "job")
    job = json.loads(job_path.read_text())
    prompts = {("base_sampler", "positive"): "a cat", ("base_sampler", "negative"): "",
               ("mask_sampler", "positive"): "a dog", ("mask_sampler", "negative"): "cat"}
    as_text, as_files = json.loads(json.dumps(job)), json.loads(json.dumps(job))
    for (field, kind), text in prompts.items():
        for doc in (as_text, as_files):
            doc[field]["model"] = model_dir.name
        as_text[field][kind] = {"prompt": text}
        embeds, pooled = direct_sdxl_encoding(model_dir, text)
        path = tmp_path / f"{field}-{kind}.safetensors"
        tensors = {"prompt_embeds": embeds.contiguous(), "pooled_prompt_embeds": pooled.contiguous()}
        if (field, kind) == ("base_sampler", "positive"):  # CLIPTextEncodeSDXL's size inputs, and diffusers' add_time_ids
            as_text[field][kind].update(width=512, height=768, crop_w=16, crop_h=8, target_width=1024, target_height=1024)
            tensors["add_time_ids"] = torch.tensor([[768.0, 512.0, 8.0, 16.0, 1024.0, 1024.0]])
        save_file(tensors, path)
        as_files[field][kind] = path.as_uri()
    as_text["output"] = (tmp_path / "text.latent").as_uri()
    as_files["output"] = (tmp_path / "files.latent").as_uri()
    options = RunOptions(models_root=str(models), device="cpu")
    run_job(parse_job(as_text), options)
    run_job(parse_job(as_files), options)
    text_out = load_file(tmp_path / "text.latent")["latent_tensor"]
    assert torch.isfinite(text_out).all()
    assert torch.equal(text_out, load_file(tmp_path / "files.latent")["latent_tensor"])
