"""Two digits in one latent: a small trained denoiser run through the two-sampler loop in each mode.

The analytic tests measure the loop against a known answer; this checks it against a
real, if tiny, network. A class-conditional diffusers UNet is trained for a few minutes
on CPU on scikit-learn's 8x8 digits (bilinearly upsampled to 16x16, pixels in [-1, 1]),
with the eps objective on the engine's default (SD1.5) noise schedule and 15% label
dropout to an extra "unconditional" class for classifier-free guidance. The class
reaches the UNet as its `encoder_hidden_states`: one learned [1, 32] token per class.

Layout of a job: a 1x16x32 latent, two digit cells side by side. The base sampler asks
digit a (its region is the left half), the mask sampler digit b (mask = right half,
grown by `--overlap` latent pixels into the left one). Training sees single 16x16
digits only; the UNet is convolutional (attention has one context token, so it adds a
per-class bias), so a 16x32 latent is two cells to it. Each sampler and mode runs
`--jobs` jobs (one latent batch: every row has its own digit pair and noise; the
grid's pairs come first, the rest are random pairs with a != b) and a
logistic regression trained on the same training split, fed each half average-pooled
back to 8x8, says which digit it sees. Reported: how often it sees digit a on the left
and digit b on the right, and the outputs' roughness (mean absolute difference of
neighbouring pixels; the training digits' is printed too): leftover noise raises it.
For comparison, each sampler alone on one 16x16 cell asking digit a (`run_alone`): how
often the digit is read, and its roughness, the model's own at this step count.

A grid of examples (rows: samplers, columns: modes; the same digit pairs and seed in
every cell) goes to docs/mode_grid.png. `--export maskfleet/demo_model` writes the
trained model as `maskfleet demo` ships it: the UNet as a diffusers folder and the class
tokens as conditioning rows (`class_tokens.safetensors`, row 10 the unconditional one);
`--demo-model maskfleet/demo_model` runs that shipped model instead of training one. Modes
come from `maskfleet.sampling.MODES` (a new mode joins the table and the grid); a sampler a
mode refuses is reported.

    pip install -e '.[bench]'   # scikit-learn
    python bench/digits_demo.py [--train-minutes 3] [--samplers euler heun ...] [--jobs 20] [--threads 1]
    python bench/digits_demo.py --train-minutes 30 --train-steps 2000 --model-dir DIR --export maskfleet/demo_model
    python bench/digits_demo.py --demo-model maskfleet/demo_model
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

from maskfleet.sampling import MODES, AdvancedSampler, InvalidInput, NoiseSchedule, sample_two_samplers
from maskfleet.sampling.unet_denoiser import UNetDenoiser
from machine import cpu_model  # bench/machine.py (scripts run with bench/ on sys.path)

CELL = 16  # one digit: 8x8 upsampled to 16x16
CLASSES = 10
UNCOND = CLASSES  # the extra class label dropout trains, used as the negative
CONTEXT_WIDTH = 32
DEFAULT_SAMPLERS = ("euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_sde", "ddim", "uni_pc", "lcm")
GRID_PAIRS = ((3, 7), (0, 4), (2, 8))  # (left, right) digit pairs shown in every grid cell


def load_split(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, train labels, test images, test labels); images [N, 1, 16, 16] in [-1, 1]."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise SystemExit("scikit-learn is missing: pip install -e '.[bench]' (or pip install scikit-learn)") from None
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 8.0 - 1.0  # 0..16 -> -1..1
    images = F.interpolate(images, size=(CELL, CELL), mode="bilinear", align_corners=False)
    labels = torch.tensor(digits.target)
    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(), test_size=0.2, random_state=seed, stratify=labels.numpy())
    return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]


def classifier_features(cells: torch.Tensor) -> "numpy.ndarray":  # noqa: F821
    """[N, 1, 16, 16] cells -> [N, 64]: average-pooled back to the data set's 8x8."""
    return F.avg_pool2d(cells.float(), 2).reshape(len(cells), -1).clamp(-1, 1).numpy()


def train_classifier(train_x, train_y, test_x, test_y):
    """A logistic regression on the 8x8 pixels, and its held-out accuracy."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=2000)
    clf.fit(classifier_features(train_x), train_y.numpy())
    return clf, float(clf.score(classifier_features(test_x), test_y.numpy()))


class DigitModel(torch.nn.Module):
    """The UNet plus the class tokens that condition it."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = torch.nn.Embedding(CLASSES + 1, CONTEXT_WIDTH)
        self.unet = UNet2DConditionModel(
            sample_size=CELL,
            in_channels=1,
            out_channels=1,
            block_out_channels=(16, 32, 32),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=CONTEXT_WIDTH,
            attention_head_dim=8,
            norm_num_groups=8,
        )

    def context(self, labels: torch.Tensor) -> torch.Tensor:
        """Class labels [N] -> encoder_hidden_states [N, 1, D]."""
        return self.tokens(labels)[:, None]


def train(model: DigitModel, schedule: NoiseSchedule, images: torch.Tensor, labels: torch.Tensor,
          minutes: float, seed: int, batch: int = 64, max_steps: int | None = None) -> tuple[DigitModel, int]:
    """Eps-prediction training on the schedule's 1000 timesteps for `minutes` (or `max_steps`, whichever
    comes first: a step count gives the same weights on the same machine); returns the EMA model and steps run."""
    g = torch.Generator().manual_seed(seed)
    alphas_cumprod = 1.0 / (1.0 + schedule.sigmas.double() ** 2)
    ema = DigitModel()
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    model.train()
    steps, deadline = 0, time.monotonic() + minutes * 60
    while time.monotonic() < deadline and (max_steps is None or steps < max_steps):
        idx = torch.randint(len(images), (batch,), generator=g)
        x0, y = images[idx], labels[idx].clone()
        y[torch.rand(batch, generator=g) < 0.15] = UNCOND
        t = torch.randint(len(alphas_cumprod), (batch,), generator=g)
        abar = alphas_cumprod[t].float()[:, None, None, None]
        eps = torch.randn(x0.shape, generator=g)
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
        pred = model.unet(x_t, t.float(), encoder_hidden_states=model.context(y)).sample
        loss = F.mse_loss(pred, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
        decay = min(0.998, (1 + steps) / (10 + steps))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - decay)
        if steps % 500 == 0:
            print(f"  train step {steps}: loss {loss.item():.4f}", flush=True)
    return ema.eval(), steps


def export_demo_model(model: DigitModel, folder: Path) -> None:
    """The model as `maskfleet demo` takes it: a bare diffusers UNet folder plus the class tokens."""
    model.unet.save_pretrained(folder, safe_serialization=True)
    save_file({"tokens": model.tokens.weight.detach().contiguous()}, folder / "class_tokens.safetensors")


def load_demo_model(folder: Path) -> DigitModel:
    """The model `export_demo_model` wrote (as `maskfleet demo` ships it), back as a DigitModel."""
    model = DigitModel()
    model.unet = UNet2DConditionModel.from_pretrained(folder, use_safetensors=True)
    model.tokens.weight.data.copy_(load_file(folder / "class_tokens.safetensors")["tokens"])
    return model


def run_jobs(model: DigitModel, denoiser: UNetDenoiser, sampler_name: str, mode: str, pairs: torch.Tensor,
             args) -> torch.Tensor:
    """One latent batch, row i asking digit pairs[i, 0] on the left and pairs[i, 1] on the right: [N, 1, 16, 32]."""
    n = len(pairs)
    latent = torch.zeros(n, 1, CELL, 2 * CELL)
    mask = torch.zeros(CELL, 2 * CELL)
    mask[:, CELL:] = 1.0
    with torch.no_grad():
        negative = model.context(torch.tensor([UNCOND]))
        base = AdvancedSampler(denoiser, args.cfg, sampler_name, args.scheduler, model.context(pairs[:, 0]), negative)
        right = AdvancedSampler(denoiser, args.cfg, sampler_name, args.scheduler, model.context(pairs[:, 1]), negative)
    return sample_two_samplers(latent, mask, base, right, seed=args.seed, steps=args.steps, denoise=1.0,
                               overlap_factor=args.overlap, mode=mode)


def run_alone(model: DigitModel, denoiser: UNetDenoiser, sampler_name: str, digits: torch.Tensor, args) -> torch.Tensor:
    """The sampler alone, one 16x16 cell per row asking `digits`: [N, 1, 16, 16].

    Coherent mode with an empty mask is the base sampler run as k-diffusion runs it (its
    state kept over the steps, one noise stream; tests/test_coherent_mode.py checks this);
    the mask sampler's result is blended in with weight 0. The model's own quality, with
    no second sampler and no seam.
    """
    with torch.no_grad():
        negative = model.context(torch.tensor([UNCOND]))
        sampler = AdvancedSampler(denoiser, args.cfg, sampler_name, args.scheduler, model.context(digits), negative)
    return sample_two_samplers(torch.zeros(len(digits), 1, CELL, CELL), torch.zeros(CELL, CELL), sampler, sampler,
                               seed=args.seed, steps=args.steps, denoise=1.0, overlap_factor=0, mode="coherent")


def region_accuracy(clf, out: torch.Tensor, pairs: torch.Tensor) -> tuple[float, float]:
    """Share of rows whose left cell reads as pairs[:, 0] and whose right cell reads as pairs[:, 1]."""
    left = clf.predict(classifier_features(out[..., :CELL]))
    right = clf.predict(classifier_features(out[..., CELL:]))
    return float((left == pairs[:, 0].numpy()).mean()), float((right == pairs[:, 1].numpy()).mean())


def roughness(images: torch.Tensor) -> float:
    """Mean absolute difference of neighbouring pixels: leftover noise raises it above the data's."""
    return float(((images[..., 1:, :] - images[..., :-1, :]).abs().mean()
                  + (images[..., :, 1:] - images[..., :, :-1]).abs().mean()) / 2)


def random_pairs(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(CLASSES, (n,), generator=g)
    b = (a + torch.randint(1, CLASSES, (n,), generator=g)) % CLASSES  # b != a
    return torch.stack([a, b], dim=1)


def save_grid(cells: dict[tuple[str, str], torch.Tensor | None], samplers, modes, path: Path) -> None:
    """rows: samplers, columns: modes; each cell the GRID_PAIRS outputs stacked, scaled up 3x."""
    from PIL import Image, ImageDraw

    zoom, pad, label_w, head_h = 3, 8, 130, 22
    cell_w = 2 * CELL * zoom
    cell_h = len(GRID_PAIRS) * (CELL * zoom + 2)
    width = label_w + len(modes) * (cell_w + pad) + pad
    height = head_h + len(samplers) * (cell_h + pad) + pad
    img = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(img)
    pairs_text = ", ".join(f"{a}|{b}" for a, b in GRID_PAIRS)
    draw.text((4, 4), f"asked {pairs_text}", fill=0)
    for j, mode in enumerate(modes):
        draw.text((label_w + j * (cell_w + pad), 4), mode, fill=0)
    for i, sampler in enumerate(samplers):
        y0 = head_h + i * (cell_h + pad)
        draw.text((4, y0 + cell_h // 2 - 6), sampler, fill=0)
        for j, mode in enumerate(modes):
            x0 = label_w + j * (cell_w + pad)
            out = cells.get((sampler, mode))
            if out is None:
                draw.text((x0 + 4, y0 + cell_h // 2 - 6), "refused", fill=0)
                continue
            for k, row in enumerate(out):
                pixels = ((row[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
                tile = Image.fromarray(255 - pixels, mode="L").resize((cell_w, CELL * zoom), Image.NEAREST)
                img.paste(tile, (x0, y0 + k * (CELL * zoom + 2)))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-minutes", type=float, default=3.0)
    parser.add_argument("--train-steps", type=int, default=None, help="stop training after this many steps")
    parser.add_argument("--samplers", nargs="+", default=list(DEFAULT_SAMPLERS))
    parser.add_argument("--jobs", type=int, default=20, help="jobs per sampler and mode")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--scheduler", default="karras")
    parser.add_argument("--cfg", type=float, default=3.0)
    parser.add_argument("--overlap", type=int, default=4, help="overlap_factor in latent (= image) pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--grid", type=Path, default=Path(__file__).resolve().parent.parent / "docs" / "mode_grid.png")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="reuse the model saved here (train and save it there when absent)")
    parser.add_argument("--export", type=Path, default=None,
                        help="also write the model as maskfleet demo ships it (maskfleet/demo_model)")
    parser.add_argument("--demo-model", type=Path, default=None,
                        help="no training: use the model maskfleet demo ships (e.g. maskfleet/demo_model)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    train_x, train_y, test_x, test_y = load_split(args.seed)
    clf, clf_acc = train_classifier(train_x, train_y, test_x, test_y)
    schedule = NoiseSchedule.from_config({})
    model = DigitModel()
    weights = args.model_dir / "digit_model.safetensors" if args.model_dir else None
    if args.demo_model is not None:
        model = load_demo_model(args.demo_model)
        train_note = f"the shipped demo model, {args.demo_model}"
    elif weights is not None and weights.is_file():
        model.load_state_dict(load_file(weights))  # safetensors: never unpickled
        train_note = f"loaded from {weights}"
    else:
        start = time.perf_counter()
        model, steps = train(model, schedule, train_x, train_y, args.train_minutes, args.seed, max_steps=args.train_steps)
        train_note = f"{steps} steps of batch 64 in {time.perf_counter() - start:.0f} s"
        if weights is not None:
            weights.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    model.eval().requires_grad_(False)
    if args.export is not None:
        export_demo_model(model, args.export)
        print(f"exported to {args.export}")
    denoiser = UNetDenoiser(model.unet, schedule, latent_scale=1.0)

    modes = list(MODES)
    # The grid's pairs lead the batch, so the pictures are rows of the measured jobs.
    pairs = torch.cat([torch.tensor(GRID_PAIRS), random_pairs(args.jobs, args.seed + 1)])[:max(args.jobs, len(GRID_PAIRS))]
    print(f"machine: {cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"model: {sum(p.numel() for p in model.parameters())} parameters, {train_note}")
    print(f"classifier: logistic regression on 8x8, held-out accuracy {clf_acc:.3f} ({len(test_y)} images)")
    print(f"jobs: {args.jobs} per cell, 1x{CELL}x{2 * CELL} latent, {args.steps} steps, {args.scheduler}, "
          f"cfg {args.cfg}, overlap {args.overlap}, denoise 1.0, seed {args.seed}")
    print(f"roughness (mean |neighbour difference|) of the training digits: {roughness(train_x):.3f}")
    print(f"\n| sampler | {' | '.join(f'{m} left | {m} right | {m} rough' for m in modes)} | alone | alone rough |")
    print(f"|---|{'---|---|---|' * len(modes)}---|---|")
    cells: dict[tuple[str, str], torch.Tensor | None] = {}
    for sampler in args.samplers:
        row = []
        for mode in modes:
            try:
                out = run_jobs(model, denoiser, sampler, mode, pairs, args)
            except InvalidInput as e:
                row += ["refused"] * 3
                cells[(sampler, mode)] = None
                print(f"  ({sampler}, {mode}: {e})")
                continue
            left, right = region_accuracy(clf, out, pairs)
            row += [f"{left:.2f}", f"{right:.2f}", f"{roughness(out):.3f}"]
            cells[(sampler, mode)] = out[: len(GRID_PAIRS)]
        try:
            alone = run_alone(model, denoiser, sampler, pairs[:, 0], args)
            correct = clf.predict(classifier_features(alone)) == pairs[:, 0].numpy()
            row += [f"{float(correct.mean()):.2f}", f"{roughness(alone):.3f}"]
        except InvalidInput:  # a sampler coherent mode refuses has no run-alone path here
            row += ["-", "-"]
        print(f"| {sampler} | {' | '.join(row)} |", flush=True)
    save_grid(cells, args.samplers, modes, args.grid)
    print(f"\ngrid: {args.grid} ({args.grid.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
