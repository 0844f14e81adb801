"""NGF: Natural Gradient Fine-tuning (natural gradient on the head; optionally SGD on more).

Karim, Al Arafat, Khalid, Guo, Rahnavard, "Efficient Backdoor Removal Through Natural Gradient
Fine-tuning", arXiv 2306.17441 (ICLR-2023 submission "In Search of Smooth Minima for Purifying
Backdoor in Deep Neural Networks"); anonymized code kr-anonymous/ngf-animus
(``Purification_NGF.py``, ``Purification_NGF_randomly_initalized.py``,
``natural_gradient_optimizer.py``, ``utils/ngf_utils.py``).

Head W (out x in) with the bias folded in as an extra input column, W1 = [W b] (out x in+1);
a1 = [phi(x), 1] its input, z = W1 a1 its output (logits). theta_r: the other updated
parameters (none, the last backbone block, or the whole backbone: ``trainable``).

    every T_cov steps:  A <- xi A + (1-xi) E[a1 a1^T]      G <- xi G + (1-xi) E[g g^T]   (init I)
                        g = dCE(z, y~)/dz = softmax(z) - onehot(y~)   per example
                        y~ = y (empirical Fisher)   or   y~ ~ softmax(z) (true Fisher)
    every T_inv steps:  A = Q_A diag(d_A) Q_A^T,  G = Q_G diag(d_G) Q_G^T   (eig. < 1e-10 -> 0)
                        S = d_G d_A^T
    natural gradient:   V  = Q_G [ (Q_G^T grad_W1 Q_A) / (S + lambda) ] Q_A^T
                           = (A (x) G + lambda I)^-1 vec(grad_W1), in the eigenbasis
    KL clipping:        nu = min(1, sqrt(kappa / sum(V * grad_W1 * lr^2)))
    momentum SGD:       d_W1 = nu V,   d_r = grad_r L   (each + wd * param once step >= 20 T_cov)
                        m <- mu m + d;  param <- param - lr m       (W1 and every theta_r)
    loss:               L = CE + (eta_F / 2) * sum_j F_j (theta_j - theta0_j)^2   (EWC; 0 = off)
                        over the updated parameters theta = (W1, theta_r)
    re-init (option):   W ~ Xavier-uniform before tuning, b kept

| symbol  | variable             | Config field              |
|---------|----------------------|---------------------------|
| theta_r | ``select_trainable`` | trainable                 |
| y~      | ``fisher_grad()``    | fisher                    |
| xi      | ``cfg.stat_decay``   | stat_decay                |
| T_cov   | ``cfg.t_cov``        | t_cov                     |
| T_inv   | ``cfg.t_inv``        | t_inv                     |
| lambda  | ``cfg.damping``      | damping                   |
| kappa   | ``cfg.kl_clip``      | kl_clip                   |
| mu      | SGD momentum         | momentum                  |
| wd      | delayed decay        | weight_decay              |
| lr      | MultiStep schedule   | lr, lr_drop1, lr_drop2, lr_gamma |
| eta_F   | ``cfg.eta_f``        | eta_f                     |
| F_j     | ``diag_fisher()``    | -                         |
| re-init | ``xavier_head()``    | reinit_head               |

Provenance. From the released code: K-FAC factors with bias folded in, batch-size-corrected G
(``utils/ngf_utils.py``, ``ComputeCovA/G.linear``), stat_decay 0.95, T_cov 10, T_inv 100, the
1e-10 eigenvalue cut, damping 1e-3, kl_clip 1e-2, momentum 0.9, weight decay 1e-4 added only
after 20 T_cov steps, lr 0.01 with MultiStepLR x0.1 at int(0.35 E) and int(0.75 E), batch 128
drawn with replacement, 100 iterations per "epoch" and 5 epochs (500 iterations).

What the code updates, and the ``trainable`` choice. ``NGF_Optimizer`` is built over
``model.parameters()`` (``natural_gradient_optimizer.py`` l. 34) but hooks only the modules
past index 66 of ``model.modules()``, the final ``linear`` (l. 90-102), so only the head is
preconditioned (and KL-clipped, l. 159-175); its ``_step`` (l. 177-200) then gives *every*
parameter with a gradient a momentum-SGD step with the delayed decay, and the scripts keep the
whole net in train mode (``Purification_NGF.py`` l. 261), so the backbone and its BatchNorm
statistics move too. ``trainable="all"`` is that; ``"last_block"`` updates
``model.last_block`` and the head (the code's comment "48 works" at l. 90 would hook layer4
for the natural gradient too; here the natural gradient stays on the head and the block gets
momentum SGD); ``"head"``, the default, is the paper's "one layer" reading: the backbone is
frozen, in eval mode.

Fisher. In ``Purification_NGF.py`` the sampled-label branch is gated to the optimizer names
'kfac'/'ekfac' (l. 278), so with 'ngf' G comes from the real labels' gradients (empirical
Fisher, the default here); ``Purification_NGF_randomly_initalized.py`` opens it to 'ngf'
(l. 306-315): every T_cov steps it back-propagates CE against labels drawn from the model's
softmax into G (true Fisher, ``fisher="true"``). Here g is that gradient in closed form.

Re-init. The random-init script re-initializes ``net.linear.weight`` Xavier-uniform and keeps
the bias (l. 197; ``reinit_head``). It also builds ``NGF_Optimizer(net)``, so all parameters
are updated there as well: the authors' variant is ``trainable="all", reinit_head=True,
fisher="true"``; their main script is ``trainable="all"`` with the defaults otherwise.

Choices made here: (1) the ``trainable="head"`` default (above); (2) the MultiStep schedule is
applied as intended (the main script steps it at the start of each epoch, l. 266, so its lr
0.01 is never used; the random-init script, milestones 0.3 / 0.75, never steps it, l. 294, so
it runs at 0.01 throughout); (3) EK-FAC rescaling of S every T_scal steps is skipped (plain
K-FAC: S = d_G d_A^T between eigendecompositions). Inferred, not in the code [spec section
4.4]: the EWC regularizer, with a diagonal Fisher computed once on the clean data, model in
eval mode, as the squared gradient of the batch-mean log-likelihood averaged over batches
(FIP's form), anchored at the updated parameters as tuning starts; eta_F defaults to 0 (off)
because the paper's value was not found.

Budget: ``epochs`` x ``steps_per_epoch`` iterations, each a full batch whose indices are drawn
with replacement (``RandomSampler(replacement=True, num_samples=100 * 128)``,
``Purification_NGF.py`` l. 152-155), so there is no partial batch to keep or drop, and epochs
stay the search's time axis whatever the size of the clean split.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from defenses import _engine as E
from zoo.classifier import Classifier
from zoo.data import DatasetInfo, Split
from zoo.loader import DeviceLoader
from zoo.runtime import Precision, autocast, eval_mode

NAME = "ngf"

OVERRIDES: dict[str, dict[str, object]] = {
    # 100 clean images: batch 32 and 40 steps/epoch (13 draws of each image per epoch; the
    # code: 128 x 100 / 500 = 26), 200 iterations in all.
    "digits": {"batch_size": 32, "steps_per_epoch": 40},
}

EWC = tuple[list[torch.Tensor], list[torch.Tensor]]  # (diagonal Fisher, anchor theta0)
EIG_CUT = 1e-10  # eigenvalues below this are set to 0 (released code)


@dataclass(frozen=True)
class Config:
    """Defaults of the anonymized NGF code (CIFAR-10, ResNet-18), head-only as the paper says."""

    lr: float = 0.01  #: initial learning rate of the momentum step
    epochs: int = 5  #: "epochs" of ``steps_per_epoch`` iterations each
    steps_per_epoch: int = 100  #: iterations per epoch (batches drawn with replacement)
    batch_size: int = 128  #: images per iteration
    momentum: float = 0.9  #: SGD momentum applied to the clipped natural gradient (and theta_r)
    weight_decay: float = 1e-4  #: L2 coefficient, added only after 20 * t_cov iterations
    damping: float = 1e-3  #: lambda added to the Kronecker eigenvalue products
    stat_decay: float = 0.95  #: xi, running-average decay of A and G (per refresh)
    kl_clip: float = 1e-2  #: kappa, bound on the step's KL (nats)
    t_cov: int = 10  #: iterations between refreshes of A and G
    t_inv: int = 100  #: iterations between eigendecompositions
    lr_drop1: float = 0.35  #: first lr drop at epoch int(lr_drop1 * epochs) (fraction of epochs)
    lr_drop2: float = 0.75  #: second lr drop at epoch int(lr_drop2 * epochs) (fraction of epochs)
    lr_gamma: float = 0.1  #: lr multiplier at each drop
    eta_f: float = 0.0  #: eta_F, weight of the diagonal-Fisher EWC penalty (0 = off)
    reinit_head: bool = False  #: Xavier-uniform head weight first, bias kept (random-init script)
    #: updated parameters: the head (natural gradient) alone, or also the last backbone block or
    #: the whole backbone (momentum SGD; the code's optimizer updates "all")
    trainable: Literal["head", "last_block", "all"] = "head"
    #: labels of G's gradients: the batch's ("empirical", main script) or drawn from the model's
    #: softmax ("true", random-init script)
    fisher: Literal["empirical", "true"] = "empirical"

    def __post_init__(self) -> None:
        E.check_common(self)
        for key in ("steps_per_epoch", "t_cov", "t_inv"):
            v = getattr(self, key)
            E.check(v >= 1, f"{key}={v}: expected an integer >= 1")
        for key in ("damping", "kl_clip"):
            E.check(getattr(self, key) > 0.0, f"{key}={getattr(self, key)}: expected a number > 0")
        E.check(0.0 <= self.stat_decay < 1.0, f"stat_decay={self.stat_decay}: expected [0, 1)")
        E.check(0.0 <= self.lr_drop1 <= self.lr_drop2 <= 1.0,
                f"lr_drop1={self.lr_drop1}, lr_drop2={self.lr_drop2}: "
                "expected 0 <= lr_drop1 <= lr_drop2 <= 1")
        E.check(0.0 < self.lr_gamma <= 1.0, f"lr_gamma={self.lr_gamma}: expected (0, 1]")
        E.check(self.eta_f >= 0.0, f"eta_f={self.eta_f}: expected a number >= 0")


@dataclass
class KFAC:
    """Kronecker factors of the head and their eigendecompositions."""

    A: torch.Tensor  # (in+1) x (in+1)
    G: torch.Tensor  # out x out
    q_a: torch.Tensor = field(init=False)
    d_a: torch.Tensor = field(init=False)
    q_g: torch.Tensor = field(init=False)
    d_g: torch.Tensor = field(init=False)
    steps: int = 0

    def __post_init__(self) -> None:
        self.eig()

    def eig(self) -> None:
        self.d_a, self.q_a = _eigh(self.A)
        self.d_g, self.q_g = _eigh(self.G)


def _eigh(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (< 1e-10 zeroed) and vectors; a non-finite factor (diverged run) becomes I
    without a host sync, so ``eigh`` never raises and the divergence is reported by the loop."""
    eye = torch.eye(len(m), device=m.device, dtype=m.dtype)
    d, q = torch.linalg.eigh(torch.where(torch.isfinite(m).all(), m, eye))
    return d * (d > EIG_CUT), q


# ============================================ ALGO LOGIC =====================================


def natural_gradient(grad: torch.Tensor, st: KFAC, damping: float) -> torch.Tensor:
    """V = Q_G [ (Q_G^T grad Q_A) / (d_G d_A^T + damping) ] Q_A^T."""
    s = st.d_g[:, None] * st.d_a[None, :]
    return st.q_g @ ((st.q_g.T @ grad @ st.q_a) / (s + damping)) @ st.q_a.T


def fisher_grad(z: torch.Tensor, y: torch.Tensor, fisher: str,
                gen: torch.Generator) -> torch.Tensor:
    """g_i = dCE(z_i, y~_i)/dz_i = softmax(z_i) - onehot(y~_i), y~ = y or y~ ~ softmax(z)."""
    p = torch.softmax(z.detach().float(), dim=1)
    if fisher == "true":
        y = torch.multinomial(p, 1, generator=gen).squeeze(1)
    return p - F.one_hot(y, p.shape[1]).to(p.dtype)


def ngf_precondition(st: KFAC, a1: torch.Tensor, g: torch.Tensor, grad: torch.Tensor,
                     cfg: Config, lr: float) -> torch.Tensor:
    """Update the factors, precondition grad_W1 = [dW db] and KL-clip it (one K-FAC step)."""
    n = a1.shape[0]
    if st.steps % cfg.t_cov == 0:
        xi = cfg.stat_decay
        st.A = xi * st.A + (1 - xi) * (a1.T @ a1) / n
        st.G = xi * st.G + (1 - xi) * (g.T @ g) / n
    if st.steps % cfg.t_inv == 0:
        st.eig()
    v = natural_gradient(grad, st, cfg.damping)
    vg = (v * grad).sum() * lr**2
    nu = torch.clamp(torch.sqrt(cfg.kl_clip / vg.clamp_min(1e-30)), max=1.0)
    return nu * v


def ngf_step(model: Classifier, opt: torch.optim.Optimizer, st: KFAC, ewc: EWC | None,
             x: torch.Tensor, y: torch.Tensor, cfg: Config, precision: Precision,
             gen: torch.Generator) -> torch.Tensor:
    """Back-propagate L; natural gradient on the head, momentum SGD on every updated parameter."""
    head: nn.Linear = model.head
    params = [p for group in opt.param_groups for p in group["params"]]
    # a frozen backbone (trainable="head") runs without a graph
    with torch.set_grad_enabled(cfg.trainable != "head"), autocast(x.device, precision):
        feats = model.features(x)
    feats = feats.float()
    z = F.linear(feats, head.weight, head.bias)
    loss = F.cross_entropy(z, y)
    total = (loss + ewc_penalty(params, *ewc, cfg.eta_f)) if ewc is not None else loss
    opt.zero_grad(set_to_none=True)
    total.backward()
    a1 = torch.cat([feats.detach(), feats.new_ones(len(feats), 1)], 1)
    g = fisher_grad(z, y, cfg.fisher, gen)
    grad = torch.cat([E.grad_of(head.weight), E.grad_of(head.bias)[:, None]], 1)
    d = ngf_precondition(st, a1, g, grad, cfg, opt.param_groups[0]["lr"])
    head.weight.grad, head.bias.grad = d[:, :-1].contiguous(), d[:, -1].contiguous()
    if st.steps >= 20 * cfg.t_cov:  # delayed decay, on every updated parameter (the code's _step)
        for p in params:
            p.grad.add_(p.detach(), alpha=cfg.weight_decay)
    opt.step()
    st.steps += 1
    return loss.detach()


def ewc_penalty(params: Sequence[torch.Tensor], fisher: Sequence[torch.Tensor],
                theta0: Sequence[torch.Tensor], eta_f: float) -> torch.Tensor | float:
    """(eta_F / 2) * sum_j F_j (theta_j - theta0_j)^2 over the updated parameters (0.0 over none)."""
    return 0.5 * eta_f * sum((f * (p - p0) ** 2).sum() for f, p, p0 in zip(fisher, params, theta0))


def diag_fisher(model: nn.Module, params: Sequence[torch.Tensor], clean: Split,
                info: DatasetInfo, batch_size: int, device: torch.device) -> list[torch.Tensor]:
    """F_j: squared gradient of the batch-mean log-likelihood, averaged over clean batches
    (model in eval mode: BatchNorm uses, and keeps, its running statistics)."""
    fisher = [torch.zeros_like(p) for p in params]
    loader = DeviceLoader(clean, info, batch_size=batch_size, device=device, train=False)
    with eval_mode(model):
        for x, y in loader:
            grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
            for f, gr in zip(fisher, grads):
                f += gr.detach() ** 2
    return [f / len(loader) for f in fisher]


# ============================================ PLUMBING =======================================


def xavier_head(head: nn.Linear, seed: int) -> None:
    """W ~ Xavier-uniform (gain 1), seeded; the bias is kept, as the random-init script does."""
    w = torch.empty(head.weight.shape)
    nn.init.xavier_uniform_(w, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        head.weight.copy_(w)


def lr_schedule(cfg: Config) -> E.LrAt:
    """MultiStepLR over epochs, milestones int(lr_drop * epochs)."""
    milestones = (int(cfg.lr_drop1 * cfg.epochs), int(cfg.lr_drop2 * cfg.epochs))
    return lambda t, ipe: E.multistep_lr(cfg.lr, t // ipe, milestones, cfg.lr_gamma)


def run(
    model: Classifier,
    clean: Split,
    info: DatasetInfo,
    cfg: Config,
    *,
    seed: int,
    device: torch.device | str,
    precision: Precision = "auto",
) -> Iterator[E.EpochResult]:
    """NGF on ``model`` in place (the head, and ``cfg.trainable``'s other parts); yield after
    each epoch."""
    dev = E.prepare(model, device, precision)
    head: nn.Linear = model.head
    if head.bias is None:
        raise E.ConfigError("ngf: the model's head has no bias: expected nn.Linear(bias=True)")
    if cfg.reinit_head:
        xavier_head(head, seed)
    params = E.select_trainable(model, cfg.trainable)
    ewc = None
    if cfg.eta_f > 0:
        theta0 = [p.detach().clone() for p in params]
        ewc = (diag_fisher(model, params, clean, info, cfg.batch_size, dev), theta0)
    st = KFAC(A=torch.eye(head.in_features + 1, device=dev), G=torch.eye(head.out_features, device=dev))
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
    gen = torch.Generator(device=dev).manual_seed(seed + 1)  # true-Fisher labels; apart from
    # the batch draws, whose generator fit seeds with ``seed``
    yield from E.fit(
        model, clean, info, epochs=cfg.epochs, batch_size=cfg.batch_size, seed=seed, device=dev,
        optimizer=opt, lr_at=lr_schedule(cfg), steps_per_epoch=cfg.steps_per_epoch,
        drop_last=False,  # no effect: every batch is drawn with replacement, full size
        step=lambda x, y: ngf_step(model, opt, st, ewc, x, y, cfg, precision, gen),
    )
