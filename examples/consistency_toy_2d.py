"""Consistency distillation in 2-D, with a teacher whose noise prediction is exact.

What it shows, in one figure: the data is a mixture of 8 Gaussians on a ring, and under Stable Diffusion's noise
schedule (scaled-linear betas, 1000 steps) its noise prediction eps(z_t, t) has a closed form. So the teacher is
perfect, and all that is left is the distillation. The teacher's probability-flow ODE (DDIM, 1000 steps)
carries noise to data along curved paths (top left). A small MLP consistency function
f(z_t, t) = c_skip(t) z_t + c_out(t) x0_theta(z_t, t) learns to jump from any point of a path to its end
(top middle). It is trained with the project's own distillation step, `lcm_lora.distill.lcd_loss` (the
skipping-step DDIM solver on N = 50 timesteps, the target f(z_{t_n}, t_n), the loss), the step that trains the
LoRA'd UNet. It then samples in 1, 2 and 4 steps as diffusers' LCMScheduler does (middle row). The teacher's DDIM
on the same timesteps is below it.

Run (about 18 s on a CPU; `--quick`, about 5 s, trains 600 steps for a smoke test):

    pip install "lcm-lora[examples]"     # matplotlib
    python examples/consistency_toy_2d.py --out consistency_toy_2d.png

Measured with the defaults (6000 steps, seed 0, 2 CPU cores; the script prints this table on every run). The
energy distance is to 4000 data points, and "on a mode" is the share of samples within 3 s of a mode's mean:

    a second draw of the data (the floor)   0.0002   98.5%
    teacher PF-ODE, DDIM 1000 steps         0.0002   99.4%
    steps      teacher DDIM    consistency model
        1   0.6651   0.0%      0.0012  94.9%
        2   0.3078   0.5%      0.0007  95.3%
        4   0.0892  31.2%      0.0007  94.7%
        8   0.0199  67.1%      0.0014  95.7%

The teacher needs many steps: each DDIM step moves towards E[x0 | z_t], which at t = 999 is the centre of the
ring. The consistency model is about as good in 1 step as in 4. Its own error, a few samples strung between
neighbouring modes, sets its floor, not the step count.
"""

import argparse
import math
import sys
import time

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    sys.exit('consistency_toy_2d.py draws its figure with matplotlib: pip install "lcm-lora[examples]"')
import torch

from lcm_lora.config import DistillArgs
from lcm_lora.distill import lcd_loss
from lcm_lora.schedule import alpha_sigma, boundary_scalings, ddim_timesteps
from lcm_lora.solver import consistency_fn, ddim_step, to_x0_eps

T = 1000  # Stable Diffusion's noise schedule: 1000 steps of scaled-linear betas from 0.00085 to 0.012
BETAS = torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float64) ** 2
ALPHAS_CUMPROD = torch.cumprod(1 - BETAS, 0).float()  # abar_t; alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t)
N = 50  # the DDIM solver's grid (LCM's skipping step k = T / N = 20), and LCMScheduler's original_inference_steps
TAU = ddim_timesteps(T, N)  # 19, 39, ..., 999


# ----- The data and its exact teacher ---------------------------------------------------------------------------

class GaussianRing:
    """x0 ~ (1/K) sum_k N(mu_k, s^2 I), K means on the unit circle."""

    def __init__(self, k: int = 8, s: float = 0.1) -> None:
        angles = torch.arange(k) * 2 * math.pi / k
        self.mu, self.s = torch.stack([angles.cos(), angles.sin()], 1), s

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        k = torch.randint(len(self.mu), (n,), generator=generator)
        return self.mu[k] + self.s * torch.randn(n, 2, generator=generator)

    def eps(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The exact noise prediction E[eps | z_t] = -sigma_t grad log p_t(z_t). Each component, diffused to
        z_t = alpha_t x0 + sigma_t eps, is N(alpha_t mu_k, v_t I) with v_t = alpha_t^2 s^2 + sigma_t^2, so the
        score is the responsibility-weighted -(z_t - alpha_t mu_k) / v_t."""
        alpha, sigma = alpha_sigma(ALPHAS_CUMPROD, t, 2)
        v = (alpha * self.s) ** 2 + sigma**2  # [B, 1]
        d = z[:, None, :] - alpha[:, None] * self.mu  # z_t - alpha_t mu_k: [B, K, 2]
        responsibility = (-(d**2).sum(-1) / (2 * v)).softmax(1)  # equal weights, equal variances
        return sigma * (responsibility[..., None] * d).sum(1) / v

    def x0(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The teacher's data estimate E[x0 | z_t] (Tweedie), from its eps with the project's adapter."""
        alpha, sigma = alpha_sigma(ALPHAS_CUMPROD, t, 2)
        return to_x0_eps(self.eps(z, t), z, alpha, sigma, "epsilon")[0]


# ----- The student ----------------------------------------------------------------------------------------------

class MLP(torch.nn.Module):
    """x0_theta(z_t, t): a 3-layer MLP on z_t, random Fourier features of z_t and sinusoidal features of t. The
    Fourier features (Tancik et al., arXiv 2006.10739) let a small MLP draw the sharp borders between the
    modes' basins: without them, 14% of the samples fell between modes instead of 5%."""

    def __init__(self, width: int = 64, z_features: int = 32, z_scale: float = 2.0, t_features: int = 8) -> None:
        super().__init__()
        self.register_buffer("b", z_scale * torch.randn(2, z_features))
        self.register_buffer("frequencies", torch.exp(torch.linspace(0, math.log(T), t_features)))
        self.net = torch.nn.Sequential(torch.nn.Linear(2 + 2 * z_features + 2 * t_features, width), torch.nn.SiLU(),
                                       torch.nn.Linear(width, width), torch.nn.SiLU(),
                                       torch.nn.Linear(width, width), torch.nn.SiLU(), torch.nn.Linear(width, 2))

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        zb, phase = z @ self.b, (t.float() / T)[:, None] * self.frequencies
        return self.net(torch.cat([z, zb.sin(), zb.cos(), phase.sin(), phase.cos()], 1))


def consistency_function(model, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """f(z_t, t) = c_skip(t) z_t + c_out(t) x0_theta(z_t, t) (LCM Eq. 9), LCMScheduler's scalings."""
    c_skip, c_out = boundary_scalings(t, ndim=2)
    return consistency_fn(z, model(z, t), c_skip, c_out)


def distill(data: GaussianRing, steps: int, batch_size: int = 256, lr: float = 4e-3):
    """Consistency distillation (LCM Algorithm 1) with the trainer's own step, `lcd_loss`, and as in LCM-LoRA the
    target is the student itself without gradients. Two choices differ from the SD runs. The student predicts
    x0 (prediction type "sample"), because an eps-predicting MLP would have its error divided by
    alpha_999 = 0.068. The loss is l2 (the trainer's --loss_type l2). The toy is unconditional: c is empty and
    w = 0, so the guided teacher is the plain one."""
    model = MLP()
    optimizer = torch.optim.Adam(model.parameters(), lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    settings = DistillArgs(w_min=0.0, w_max=0.0, num_ddim_timesteps=N, loss_type="l2")
    no_text = torch.zeros(batch_size, 0)
    losses = []
    for _ in range(steps):
        loss = lcd_loss(student=lambda z, t, c: model(z, t), teacher=lambda z, t, c: data.x0(z, t),
                        target=lambda z, t, c: model(z, t), x0=data.sample(batch_size), c=no_text,
                        c_uncond=no_text, alphas_cumprod=ALPHAS_CUMPROD, tau=TAU, d=settings,
                        prediction_type="sample").mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return model.eval(), losses


# ----- Samplers -------------------------------------------------------------------------------------------------

def lcm_timesteps(num_steps: int) -> torch.Tensor:
    """LCMScheduler.set_timesteps: num_steps evenly spaced indices into the reversed grid (4 steps: 999 759 499 259)."""
    indices = torch.floor(torch.arange(num_steps) * (N / num_steps)).long()
    return TAU.flip(0)[indices]


@torch.no_grad()
def consistency_sample(model, z: torch.Tensor, timesteps: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Multistep consistency sampling (CM arXiv 2303.01469 Algorithm 1), as LCMScheduler.step does it:
    x = f(z_t, t), then fresh noise to the next timestep, z = alpha_next x + sigma_next eps."""
    for i, t in enumerate(timesteps):
        x = consistency_function(model, z, t.repeat(len(z)))
        if i + 1 < len(timesteps):
            alpha, sigma = alpha_sigma(ALPHAS_CUMPROD, timesteps[i + 1].repeat(len(z)), 2)
            z = alpha * x + sigma * torch.randn(z.shape, generator=generator)
    return x


@torch.no_grad()
def ddim_sample(data: GaussianRing, z: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The teacher's deterministic DDIM (eta = 0) through `timesteps`, ending on its x0 estimate; every z visited."""
    path = [z]
    for i, t in enumerate(timesteps):
        alpha, sigma = alpha_sigma(ALPHAS_CUMPROD, t.repeat(len(z)), 2)
        x0, eps = to_x0_eps(data.eps(z, t.repeat(len(z))), z, alpha, sigma, "epsilon")
        if i + 1 < len(timesteps):
            z = ddim_step(x0, eps, *alpha_sigma(ALPHAS_CUMPROD, timesteps[i + 1].repeat(len(z)), 2))
        else:
            z = x0
        path.append(z)
    return torch.stack(path)


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """2 E|X - Y| - E|X - X'| - E|Y - Y'| (Szekely & Rizzo): 0 when the distributions are equal."""
    return (2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean()).item()


def on_a_mode(x: torch.Tensor, data: GaussianRing) -> float:
    """The share of points within 3 s of a mode's mean (98.9% of the data itself)."""
    return (torch.cdist(x, data.mu).min(1).values < 3 * data.s).float().mean().item()


# ----- The figure -----------------------------------------------------------------------------------------------

RING = ["#e6194b", "#f58231", "#ffd700", "#3cb44b", "#42d4f4", "#4363d8", "#911eb4", "#f032e6"]


def draw(out: str, reference, paths, mapping, samples: dict, scores: dict, floor: float, ode_score: float):
    """Row 1: the PF-ODE, f along one path per mode, quality against steps. Rows 2 and 3: samples."""
    cmap = matplotlib.colors.LinearSegmentedColormap.from_list("ring", RING + RING[:1])
    colour = lambda x: cmap(torch.atan2(x[:, 1], x[:, 0]) / (2 * math.pi) % 1)  # a mode's hue at its angle
    grey, limit = "#d0d0d0", 2.4
    fig, axes = plt.subplots(3, 3, figsize=(13, 13.4), layout="constrained")
    for ax in [axes[0, 0], axes[0, 1], *axes[1:].flat]:
        ax.set(xlim=(-limit, limit), ylim=(-limit, limit), aspect="equal", xticks=[], yticks=[])
        ax.scatter(*reference.T, s=2, color=grey, zorder=0, rasterized=True)

    ax, ends = axes[0, 0], paths[-1]
    for k in range(paths.shape[1]):
        ax.plot(*paths[:, k].T, color=colour(ends[k:k + 1])[0], lw=0.6, alpha=0.7)
    ax.scatter(*paths[0].T, s=5, color="black", zorder=3, label="noise, t = 999")
    ax.scatter(*ends.T, s=14, color=colour(ends), edgecolors="black", linewidths=0.3, zorder=3, label="its end, x0")
    ax.set_title("the teacher's PF-ODE (DDIM, 1000 steps)\ncarries noise to data", loc="left", fontsize=10)
    ax.legend(loc="lower left", fontsize=8)

    ax = axes[0, 1]
    for path, z_t, f_z in mapping:
        c = colour(path[-1:])[0]
        ax.plot(*path.T, color=c, lw=1, alpha=0.6)
        for z, f in zip(z_t, f_z):
            ax.annotate("", xy=f.tolist(), xytext=z.tolist(),
                        arrowprops=dict(arrowstyle="-|>", color=c, lw=0.8, shrinkA=2, shrinkB=0, mutation_scale=8))
        ax.scatter(*z_t.T, s=16, color=c, edgecolors="black", linewidths=0.4, zorder=3)
        ax.scatter(*path[-1], s=160, marker="*", color=c, edgecolors="black", linewidths=0.6, zorder=4)
    ax.set_title("the consistency function: f(z_t, t) at t = 999, 759,\n"
                 "499, 259 (dots) jumps to the path's end (stars)", loc="left", fontsize=10)

    ax, steps = axes[0, 2], sorted(scores["consistency model"])
    for name, marker in (("teacher DDIM", "s"), ("consistency model", "o")):
        ax.plot(steps, [scores[name][n][0] for n in steps], marker=marker, label=name)
    ax.axhline(ode_score, color="tab:green", ls="--", lw=1, label="teacher PF-ODE, 1000 steps")
    ax.axhline(floor, color="grey", ls=":", lw=1, label="a second draw of the data")
    ax.set(xscale="log", yscale="log", xlabel="sampling steps", ylabel="energy distance to the data")
    ax.set_xticks(steps, [str(n) for n in steps])
    ax.minorticks_off()
    ax.set_title("quality against steps\n(lower is better)", loc="left", fontsize=10)
    ax.legend(loc="upper right", fontsize=8)

    for row, name in ((1, "consistency model"), (2, "teacher DDIM")):
        for col, n in enumerate((1, 2, 4)):
            ax, x = axes[row, col], samples[name][n]
            ax.scatter(*x.T, s=3, color=colour(x), alpha=0.7, rasterized=True)
            distance, share = scores[name][n]
            ax.set_title(f"{name}, {n} step{'s' * (n > 1)}\nenergy distance {distance:.4f}, {share:.0%} on a mode",
                         loc="left", fontsize=10)
    fig.suptitle("Consistency distillation of a Gaussian mixture (grey) from an exact teacher, on Stable Diffusion's "
                 "noise schedule", fontsize=13)
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="consistency_toy_2d.png", help="The figure (PNG).")
    parser.add_argument("--train_steps", type=int, default=6000)
    parser.add_argument("--num_samples", type=int, default=4000, help="Samples per distribution compared.")
    parser.add_argument("--quick", action="store_true", help="600 training steps and 1000 samples: a smoke test.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train_steps, n = (600, 1000) if args.quick else (args.train_steps, args.num_samples)
    torch.set_num_threads(1)  # a 64-wide MLP runs fastest on one thread; more only contend
    torch.manual_seed(args.seed)  # the MLP's init, and lcd_loss's draws of t and noise
    generator = torch.Generator().manual_seed(args.seed + 1)  # the evaluation's noise and data
    data, start = GaussianRing(), time.perf_counter()

    model, losses = distill(data, train_steps)
    print(f"distilled {train_steps} steps in {time.perf_counter() - start:.1f} s; "
          f"loss {sum(losses[:50]) / 50:.2e} -> {sum(losses[-50:]) / 50:.2e}")

    reference = data.sample(n, generator)
    score = lambda x: (energy_distance(x, reference), on_a_mode(x, data))
    floor, ode = score(data.sample(n, generator)), ddim_sample(data, torch.randn(n, 2, generator=generator),
                                                             torch.arange(T - 1, -1, -1))
    ode_score = score(ode[-1])
    samples, scores = {"teacher DDIM": {}, "consistency model": {}}, {"teacher DDIM": {}, "consistency model": {}}
    for steps in (1, 2, 4, 8):
        noise = torch.randn(n, 2, generator=generator)  # the same noise for both samplers
        samples["teacher DDIM"][steps] = ddim_sample(data, noise, lcm_timesteps(steps))[-1]
        samples["consistency model"][steps] = consistency_sample(model, noise, lcm_timesteps(steps), generator)
        for name in scores:
            scores[name][steps] = score(samples[name][steps])

    print(f"quality, {n} samples each: energy distance to the data (lower is better), share on a mode")
    print(f"  a second draw of the data (the floor)   {floor[0]:.4f} {floor[1]:7.1%}")
    print(f"  teacher PF-ODE, DDIM 1000 steps         {ode_score[0]:.4f} {ode_score[1]:7.1%}")
    print("  steps      teacher DDIM    consistency model")
    for steps in (1, 2, 4, 8):
        (d_teacher, m_teacher), (d_cm, m_cm) = scores["teacher DDIM"][steps], scores["consistency model"][steps]
        print(f"  {steps:5d}   {d_teacher:.4f} {m_teacher:6.1%}      {d_cm:.4f} {m_cm:6.1%}")

    # One path per mode for the mapping panel: the one starting farthest out within the plot; the 4-step timesteps
    # are on it.
    ts, start_radius = lcm_timesteps(4), ode[0].norm(dim=1)
    mode_of_end = torch.cdist(ode[-1], data.mu).argmin(1)
    mapping = []
    for k in range(len(data.mu)):
        i = int(torch.where((mode_of_end == k) & (start_radius < 2.0), start_radius, -1.0).argmax())
        z_t = ode[T - 1 - ts, i]  # ode[j] is z at t = 999 - j (ode[1000] is x0)
        with torch.no_grad():
            mapping.append((ode[:, i], z_t, consistency_function(model, z_t, ts)))
    draw(args.out, reference[:2000], ode[:, :160], mapping, samples, scores, floor[0], ode_score[0])
    print(f"wrote {args.out} ({time.perf_counter() - start:.1f} s in all)")


if __name__ == "__main__":
    main()
