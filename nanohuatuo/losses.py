"""The output-layer maths SFT, PPO and DPO share: cross-entropy and per-token log-probs through the
output matrix without ever holding the (tokens, vocab) logits in full.

- `ce_grad_(logits, targets)`: per-row cross-entropy, turning the logits in place into
  softmax - onehot, the gradient of each row's loss (one exp pass, no copies).
- `logits_into(h, W, buf)`: one chunk of float32 logits h @ W.T, into a reused buffer.
- `linear_cross_entropy(h, W, targets)` (SFT's loss, `LinearCrossEntropy`): summed CE of
  h @ W.T, a chunk of rows at a time, with the gradients of h and W taken in the forward pass.
- `token_logprobs(model, h, targets, T)` (PPO's log-probs, `TokenLogprobs`): log softmax(h @ W.T /
  T)[target] per row, with the gradient of h taken in the forward pass through a frozen W.
- `response_forward(model, ids, attn, P, T)`: per-token log-probs, entropy and values of the
  responses after a batch of left-padded prompts (one trunk forward).
- `masked_mean`, `masked_var`, `whiten`: statistics over the valid (mask 1) entries of a tensor.
- `length_debias(scores, lengths, coef)`: scores with the batch's linear dependence on answer
  length taken out (PPO's --length-debias).
- GRPO / RLOO (their own block at the end): `group_advantages(scores, k, mode, scale)`, one
  advantage per answer from the K answers to its prompt; `kl_k3(logp, ref_logp)`, the per-token
  KL estimate; `grpo_loss(...)`, the token-level clipped surrogate plus beta * k3 KL.
- DPO (its own block at the end): `sequence_logprobs(model, ids, starts, lengths)`, the summed
  log-probs of each row's answer; `dpo_loss(...)`, the sigmoid (DPO, conservative DPO), ipo and
  hinge objectives on them.
"""

import torch
import torch.nn.functional as F

IGNORE = -100  # label of positions without a loss (prompt tokens, padding)


def logits_into(h, weight, buf):
    """float32 logits h @ weight.T of one chunk, written into the reused buffer when the dtypes allow."""
    if h.dtype == weight.dtype == torch.float32 and not torch.is_autocast_enabled(h.device.type):
        return torch.mm(h, weight.t(), out=buf[:len(h)])  # no fresh (rows, vocab) allocation per chunk
    return (h @ weight.t()).float()  # under autocast the matmul runs in bf16; the softmax below in float32


def ce_grad_(logits, targets):
    """Per-row cross-entropy (n,) of float32 logits (n, vocab) at targets (n,); logits become, in
    place, softmax - onehot(targets), the gradient of each row's loss with respect to its logits."""
    rows = torch.arange(len(targets), device=logits.device)
    picked = logits[rows, targets]
    top = logits.amax(-1, keepdim=True)
    total = logits.sub_(top).exp_().sum(-1, keepdim=True)
    loss = (top + total.log()).squeeze(1) - picked  # log-sum-exp minus the target's logit
    logits.div_(total)
    logits[rows, targets] -= 1
    return loss


# ----------------------------------------------------------------------------- SFT: summed cross-entropy

class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i @ W^T, t_i), `chunk` rows at a time, with the gradients of h and W computed in the
    forward pass (softmax - onehot is at hand there) and only scaled in backward: the float32 logits
    of one chunk are the largest temporary, never the whole (N, vocab) matrix and its gradient."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # under autocast the matmuls below run in bf16; without it the dtypes must agree
        cast = None if torch.is_autocast_enabled(h.device.type) else weight.dtype
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        buf = torch.empty(min(chunk, len(h)), weight.shape[0], dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], chunk):
            hc, tc = h[s:s + chunk], targets[s:s + chunk]
            g = logits_into(hc, weight, buf)
            total += ce_grad_(g, tc).sum()  # g is now d CE / d logits
            g = g if cast is None else g.to(cast)
            if need_h:
                grad_h[s:s + chunk] = g @ weight
            if need_w:
                grad_w += g.t() @ hc
        ctx.w_dtype = weight.dtype
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * grad_total.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = (grad_w * grad_total).to(ctx.w_dtype)
        return grad_h, grad_w, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the logits h @ weight.T (h (N, dim), weight (vocab, dim)) at targets (N,)."""
    # rows per chunk: 512 MB of float32 logits; fewer, larger matmuls run faster on CPU and GPU alike
    chunk = max(1, 2**27 // weight.shape[0])
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return LinearCrossEntropy.apply(h, weight, targets, chunk)
    buf = torch.empty(min(chunk, len(h)), weight.shape[0], dtype=torch.float32, device=h.device)
    return sum((ce_grad_(logits_into(h[s:s + chunk], weight, buf), targets[s:s + chunk]).sum()
                for s in range(0, len(h), chunk)), torch.zeros((), device=h.device))


def output_weight(model) -> torch.Tensor:
    """The output matrix as `Transformer.logits` uses it (Baichuan2's NormHead normalises its rows)."""
    w = model.lm_head.weight
    return F.normalize(w, dim=-1) if model.config.norm_head and w.requires_grad else w


# ----------------------------------------------------------------------------- PPO: per-token log-probs

class TokenLogprobs(torch.autograd.Function):
    """Per row: log softmax(h @ W.T / T)[target], for a frozen W, with its gradient.

    Chunk by chunk, the gradient with respect to h, (onehot - softmax) @ W / T, is computed in the
    forward pass while the softmax is at hand (ce_grad_) and only scaled in backward: the (rows,
    vocab) logits are never kept for backward, and no log-softmax backward pass over them is needed.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, temperature, chunk):
        logp = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        grad = torch.empty_like(h)
        buf = torch.empty(min(chunk, len(h)), weight.shape[0], dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], chunk):
            z = logits_into(h[s:s + chunk], weight, buf).div_(temperature)
            logp[s:s + chunk] = -ce_grad_(z, targets[s:s + chunk])  # z is now d(-logp)/dz
            grad[s:s + chunk] = (z.to(weight.dtype) @ weight).mul_(-1.0 / temperature).to(h.dtype)
        ctx.save_for_backward(grad)
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        (grad,) = ctx.saved_tensors
        return grad * grad_logp[:, None].to(grad.dtype), None, None, None, None


def token_logprobs(model, h, targets, temperature, want_entropy=False):
    """(logp, entropy or None) of targets (N,) under softmax(logits(h) / temperature), h (N, dim).

    With a gradient to take through a frozen output matrix (the PPO update), TokenLogprobs; else
    (the no-grad rollout forwards, or a trained output matrix) plain autograd on the logits.
    """
    weight = model.lm_head.weight
    if torch.is_grad_enabled() and h.requires_grad and not weight.requires_grad and not want_entropy:
        chunk = max(1, 2**25 // weight.shape[0])  # 128 MB of float32 logits at a time
        return TokenLogprobs.apply(h, weight, targets, temperature, chunk), None
    z = model.logits(h).float().div_(temperature)  # in place: the fresh logits are not needed unscaled
    lse = z.logsumexp(-1)
    logp = z.gather(-1, targets[:, None]).squeeze(-1) - lse
    entropy = None
    if want_entropy:
        with torch.no_grad():  # logged only; one (N, vocab) temporary, multiplied in place
            entropy = lse - z.softmax(-1).mul_(z).sum(-1)
    return logp, entropy


def response_forward(model, ids, attn, P, temperature, value_head=None, want_logp=True, want_entropy=False):
    """Per-token (logp, entropy, values), each (B, R) or None, for the response ids[:, P:].

    ids, attn (B, P + R): left-padded prompt then response; positions come from attn, so padding
    never shifts them. The output at position t predicts token t + 1, so the response's log-probs
    and values are read from P - 1 (the last prompt token) to the second-to-last position.
    Log-probs and entropy are of logits / temperature, the distribution the tokens were sampled from.
    """
    h = model.hidden_states(ids, attention_mask=attn)  # (B, P + R, dim)
    h = h[:, P - 1:-1]  # (B, R, dim): the states that predict the response tokens
    B, R = h.shape[:2]
    logp = entropy = values = None
    if want_logp or want_entropy:
        flat = h.reshape(B * R, -1)  # one (B * R, dim) matrix: a 3-d strided slice would make matmul batch
        logp, entropy = token_logprobs(model, flat, ids[:, P:].reshape(-1), temperature, want_entropy)
        logp = logp.view(B, R) if want_logp else None
        entropy = entropy.view(B, R) if want_entropy else None
    if value_head is not None:
        values = value_head(h.float()).squeeze(-1)
    return logp, entropy, values


# ----------------------------------------------------------------------------- masked statistics

def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x, mask):
    mean = masked_mean(x, mask)
    return masked_mean((x - mean) ** 2, mask)


def whiten(x, mask, shift_mean=True):
    """(x - mean) / std over the valid (mask 1) entries only; unchanged (zeroed padding) under 2 of them."""
    n = mask.sum()
    if n < 2:
        return x * mask
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / (n - 1)  # unbiased, as the reference implementations
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def length_debias(scores, lengths, coef: float):
    """The scores less coef times their least-squares slope on answer length within the batch:
    score_i - coef * slope * (len_i - mean len). With coef 1 the batch's scores no longer correlate
    with length, so no answer gains from being shorter or longer than its batch-mates.

    Reward models (and the offline judge's similarity stand-in) correlate with length, and PPO
    finds it: answers drift to the length the scorer likes rather than better content (Singhal et
    al. 2023, "A Long Way to Go: Investigating Length Correlations in RLHF"). Regressing the length
    out is what AlpacaEval 2's length control does to a judge's verdicts (Dubois et al. 2024) and
    ODIN does inside the reward model (Chen et al. 2024); done per batch it needs no second reward
    head. Its cost: where a longer answer really is better, that part of the signal goes too. A
    penalty on the distance to a fixed length was tried first: answers vary in length by nature,
    so it mostly punished that variance and drowned the reward model's signal."""
    if coef == 0 or len(scores) < 3:
        return scores, 0.0
    x = lengths.float() - lengths.float().mean()
    slope = float((x * (scores - scores.mean())).sum() / (x * x).sum().clamp(min=1e-9))
    return scores - coef * slope * x, slope


# ----------------------------------------------------------------------------- GRPO / RLOO (critic-free)

def group_advantages(scores, k: int, mode: str = "grpo", scale: bool = True, eps: float = 1e-4):
    """(B,) advantages of B = n * k answers, the k answers to one prompt consecutive.

    grpo (Shao et al. 2024): (r - mean of the group) / (std of the group + eps), the unbiased std
    as TRL; scale=False leaves the std out (Dr. GRPO, Liu et al. 2025: dividing by it weights
    nearly-solved and nearly-hopeless prompts up). rloo (Ahmadian et al. 2024): r - the mean of
    the other k - 1 answers, an unbiased baseline (= k / (k - 1) * (r - mean of the group));
    scale=True divides it by the group's std too. A group whose answers all score the same gets 0.
    """
    if k < 2:
        raise ValueError(f"group advantages need k >= 2 answers per prompt, got k={k}")
    r = scores.float().view(-1, k)
    mean = r.mean(-1, keepdim=True)
    if mode == "grpo":
        adv = r - mean
    elif mode == "rloo":
        adv = r - (r.sum(-1, keepdim=True) - r) / (k - 1)
    else:
        raise ValueError(f"advantage {mode!r}: use 'grpo' or 'rloo'")
    if scale:
        adv = adv / (r.std(-1, keepdim=True) + eps)
    return adv.reshape(-1)


def kl_k3(logp, ref_logp):
    """Per-token k3 estimate of KL(policy || reference) at the sampled tokens: r - 1 - log r with
    r = p_ref / p (Schulman 2020): >= 0, unbiased, lower variance than logp - ref_logp."""
    d = ref_logp - logp
    return torch.expm1(d) - d


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip=0.2, beta=0.0, max_log_ratio=20.0, denom=None):
    """GRPO's token-level objective: sum((max(-A r, -A clip(r, 1 - clip, 1 + clip)) + beta * k3) * mask) / denom.

    logp (B, R) with gradient; old_logp the sampling policy's (= logp.detach() with one update per
    rollout, so r = 1 and the loss is the plain policy gradient); ref_logp the reference's (None
    when beta is 0); advantages (B,), one per answer, spread over its tokens. denom defaults to the
    number of valid tokens: every token of the step weighs the same, however long its answer
    (DAPO's token-level mean; a per-answer mean would weigh a short answer's tokens more).
    Returns (loss, stats): clipfrac, kl (masked mean of k3 to the reference; NaN without one), ratio.
    """
    log_ratio = (logp - old_logp).clamp(-max_log_ratio, max_log_ratio)
    ratio = log_ratio.exp()
    adv = advantages[:, None]
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1 - clip, 1 + clip)
    per_token = torch.maximum(pg1, pg2)
    kl = kl_k3(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    if beta:
        per_token = per_token + beta * kl
    n = mask.sum() if denom is None else denom
    loss = (per_token * mask).sum() / n
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((pg2 > pg1).float(), mask), "ratio": masked_mean(ratio, mask),
                 "kl": masked_mean(kl, mask) if ref_logp is not None else torch.tensor(float("nan"))}
    return loss, stats
# ============================================================================= DPO: preference losses
# (DPO's own block: the per-answer log-probs it needs and the pairwise objectives on them.)

def sequence_logprobs(model, ids, starts, lengths):
    """(B,) summed log-probs of each row's answer, ids[b, starts[b]:lengths[b]], and (B,) its token count.

    ids (B, T) right-padded: with the causal mask a real token never sees a pad, so no attention
    mask is needed. Only the answer positions reach the output matrix (token_logprobs, chunked):
    the (B, T, vocab) logits never exist."""
    h = model.hidden_states(ids)  # (B, T, dim)
    B, T = ids.shape
    pos = torch.arange(T - 1, device=ids.device)
    # the state at t predicts token t + 1: answer tokens starts..lengths-1 are read from starts-1..lengths-2
    keep = (pos[None] >= starts[:, None] - 1) & (pos[None] < lengths[:, None] - 1)  # (B, T - 1)
    rows, cols = keep.nonzero(as_tuple=True)
    h, targets = h[rows, cols], ids[rows, cols + 1]
    # with a gradient, token_logprobs chunks the logits itself; without (the reference) it would take all at once
    chunk = len(h) if torch.is_grad_enabled() else max(1, 2**25 // model.lm_head.weight.shape[0])
    logp = torch.cat([token_logprobs(model, h[s:s + chunk], targets[s:s + chunk], 1.0)[0]
                      for s in range(0, len(h), chunk)]) if len(h) else h.new_zeros(0, dtype=torch.float32)
    total = torch.zeros(B, dtype=logp.dtype, device=ids.device).index_add(0, rows, logp)
    return total, keep.sum(-1)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1, loss_type="sigmoid",
             label_smoothing=0.0):
    """Per-pair DPO-family losses (P,) and the implicit rewards beta * (logp - ref_logp) of both answers.

    The inputs are (P,) answer log-probs under the policy and the reference. With the margin
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected):
        sigmoid (DPO, Rafailov et al. 2023): -logsigmoid(beta * h); with label_smoothing e (conservative
                 DPO: the labels are wrong with probability e) -(1 - e) logsigmoid(beta h) - e logsigmoid(-beta h)
        ipo     (Azar et al. 2023): (h - 1 / (2 beta))^2, a squared loss that stops at a finite margin;
                 the caller passes per-token mean log-probs, as the IPO paper and TRL do
        hinge   (SLiC, Zhao et al. 2023): relu(1 - beta * h)
    """
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"DPO loss {loss_type!r}: use sigmoid, ipo or hinge")
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses, chosen_rewards, rejected_rewards
