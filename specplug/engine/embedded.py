"""The embedded engine: any HF causal LM as target, any specplug drafter, batched.

One decode step for a batch of rows:
  1. drafter.propose -> chain/tree per row (target vocabulary)
  2. the target runs once on [last committed token, draft nodes...] with a tree mask
  3. verify -> accepted drafts + recovered/bonus token per row
  4. the cache keeps the accepted path's slots, the rest is masked out (rollback is free)
Rows are batched continuously, as the serving engines do: up to `batch_size` rows decode
together, and a finished row's place goes to the next waiting request at once (its prompt is
prefilled on its own, then its cache rows join the batch's).  Static batches would make every row
wait for the batch's slowest one, so tokens a fast row gains by speculation would buy nothing.
With a SpeculationBudget (specplug/budget.py) step 1 is preceded by each row's draft budget:
rows whose budget is 0 are not drafted for, the others' proposals are cut to their budget.  A
drafter that scores its nodes (suffix) drafts in full instead, and the budget keeps each row's
best-scored nodes.  Either way the block is narrowed to the longest row kept: every row is
padded to it, and the budget counts that padding as verify cost.
"""
from __future__ import annotations

import gc
import time

import torch

from ..budget import SpeculationBudget
from ..drafters.base import Drafter
from ..models.attention import use_grouped_attention
from ..models.decoder_stack import decoder_stack_for
from ..models.packed_linear import pack_linears
from ..stats import SpecStats, elapsed_ms
from ..types import PAD, DraftInput, DraftProposal, SamplingParams
from ..verify import verify
from ..sampling import next_tokens
from .kv import SlotCache
from .rows import Request, RequestOutput, Row
from .verify_cost import measure_verify_costs

# the start-up measurement's context: the prompts' median length, at most this (its prefill
# is one prompt's; the widths are timed over it)
MAX_MEASURED_CONTEXT = 512


class PromptTooLong(ValueError):
    pass


def context_limit(config) -> int:
    return int(getattr(config, "max_position_embeddings", 0) or 1 << 30)


def tree_block_mask(proposal: DraftProposal) -> torch.Tensor:
    """[batch, n + 1, n + 1] bool: block input i may see block input j when j is i's ancestor
    or i itself.  Block input 0 is the last committed token, input j + 1 is node j.  Built on
    the proposal's device, one column of nodes at a time (parents precede children)."""
    batch, n = proposal.tokens.shape
    device = proposal.tokens.device
    mask = torch.zeros(batch, n + 1, n + 1, dtype=torch.bool, device=device)
    mask[:, :, 0] = True
    rows = torch.arange(batch, device=device)
    for j in range(n):
        seen = mask[rows, proposal.parents[:, j].clamp(min=-1) + 1].clone()  # [batch, n + 1]
        seen[:, j + 1] = True
        real = (proposal.tokens[:, j] != PAD)[:, None]
        mask[:, j + 1] = torch.where(real, seen, mask[:, j + 1])
    return mask


class EmbeddedEngine:
    def __init__(self, model, tokenizer=None, drafter: Drafter | None = None,
                 num_draft_tokens: int = 5, sampling: SamplingParams = SamplingParams(),
                 budget: SpeculationBudget | None = None, compile_target: bool = False):
        self.model = model.eval()
        # a verify block of several tokens a row attends without copying the cache per query
        # head (specplug/models/attention.py); this switches the model object itself
        use_grouped_attention(self.model)
        if not compile_target:  # (inductor packs weights its own way)
            # every CPU linear of the target and the drafter on weights packed once for oneDNN
            # (specplug/models/packed_linear.py: a bf16 decode step 21.5 -> 17.5 ms, SmolLM2)
            for module in [self.model] + (drafter.torch_modules() if drafter else []):
                pack_linears(module)
        # compile_target: the target's forward through torch.compile (dynamic shapes).  Off by
        # default: measured on CPU (benchmarks/compile_target.py) it does not pay, since every
        # cache update breaks the graph and the growing shapes recompile
        self.target = torch.compile(self.model, dynamic=True) if compile_target else (
            # its layers through specplug's DecoderLayer where the architecture allows
            # (models/decoder_stack.py), transformers' forward otherwise
            decoder_stack_for(self.model) or self.model)
        self.device = model.device  # every tensor the engine makes lives here
        self.budget = budget if drafter else None
        self.tokenizer = tokenizer
        self.drafter = drafter
        self.num_draft_tokens = num_draft_tokens if drafter else 0
        self.sampling = sampling
        self.hidden_layers = drafter.needs.hidden_layers if drafter else ()
        eos = getattr(model.generation_config, "eos_token_id", None) if hasattr(model, "generation_config") else None
        if eos is None and tokenizer is not None:
            eos = tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        self._next_row_id = 0
        self._costs_measured = False  # the budget's verify costs, timed at the first generate

    # -- public API ---------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, requests: list[Request], batch_size: int = 1,
                 stats: SpecStats | None = None) -> tuple[list[RequestOutput], SpecStats]:
        stats = stats or SpecStats()
        limit = context_limit(self.model.config)
        for req in requests:
            need = len(req.prompt_ids) + req.max_new_tokens + self.num_draft_tokens + 1
            if not req.prompt_ids:
                raise ValueError("empty prompt")
            if need > limit:
                raise PromptTooLong(
                    f"prompt of {len(req.prompt_ids)} tokens + max_new_tokens {req.max_new_tokens} "
                    f"+ {self.num_draft_tokens + 1} verify slots exceeds the model's context of {limit}")
        # What lives now (torch, transformers, the model, the drafter's weights) outlives the
        # run: frozen, Python's full collections stop walking it.  Each walk took ~200 ms
        # (MT-Bench, batch 32, bf16): the suffix drafter's index nodes trigger several per run,
        # 0.5 s of its 6.5 s.  Frozen objects are still freed by reference counting.
        gc.freeze()
        start = time.perf_counter()
        outputs = self._run(requests, batch_size, stats)
        stats.wall_time_s += time.perf_counter() - start
        stats.num_prompts += len(requests)
        stats.total_new_tokens += sum(o.num_new_tokens for o in outputs)
        return outputs, stats

    # -- continuous batching: admit waiting requests, step, retire finished rows -------------
    def _run(self, requests: list[Request], batch_size: int, stats: SpecStats
             ) -> list[RequestOutput]:
        if self.budget is not None and not self._costs_measured and requests:
            self._measure_verify_costs(requests, batch_size)
        rows = [self._new_row(req) for req in requests]  # row ids follow request order
        waiting = list(reversed(rows))
        cache = SlotCache(0, self.device)
        active: list[Row] = []
        while waiting or active:
            finished = [i for i, r in enumerate(active) if r.finish_reason]
            joined = []
            while waiting and len(active) - len(finished) + len(joined) < max(1, batch_size):
                joined.append(waiting.pop())
            if finished or joined:
                with stats.timer("prefill"):
                    active = self._turn_over(active, finished, joined, cache)
            if active:
                # a step right after an admission also drafts over the new rows' prompts
                active = self.step(active, cache, stats, first_step=bool(joined))
        return [r.output(self.tokenizer) for r in rows]

    def _turn_over(self, active: list[Row], finished: list[int], joined: list[Row],
                   cache: SlotCache) -> list[Row]:
        """Retire the rows at indices `finished`, prefill `joined` and seat the ones still
        running: in the finished rows' places first (their cache rows are overwritten in
        place), then after the others.  Returns the new batch.

        Dropping a row and appending one each copied every layer's whole cache (measured at
        batch 10, bf16: 0.36 s + 0.29 s of a 14 s run); overwriting a row costs that row's
        entries.  Each prompt is prefilled alone: a padded block of prompts would cost the
        longest one times their number, so a batch that admits requests together (plain
        decoding, where rows finish on the same step) would pay more for the same prompts
        than one admitting them as they trickle in (measured: MT-Bench at batch 10, 23.5 s of
        prefill against 14-16 s)."""
        self._forget([active[i] for i in finished])
        prefilled = []
        for row in joined:
            alone = SlotCache(1, self.device)
            self.prefill([row], alone)
            prefilled.append(alone)
        running = [r for r in joined if not r.finish_reason]  # EOS or max_new_tokens=1
        self._forget([r for r in joined if r.finish_reason])
        caches = [c for c, r in zip(prefilled, joined) if not r.finish_reason]
        seated = min(len(finished), len(running))
        batch = list(active)
        for place, row, alone in zip(finished, running, caches):
            cache.replace_rows([place], alone, [0])
            batch[place] = row
        if len(finished) > seated:  # nobody left to take these places: the last rows move in
            batch = [batch[i] for i in cache.drop_rows(finished[seated:])]
        if len(running) > seated:  # the rest join at the end, in one copy of the cache
            cache.absorb(caches[seated:])
            batch += running[seated:]
        return batch

    def _measure_verify_costs(self, requests: list[Request], batch_size: int) -> None:
        """Seed the budget's cost model with this engine's verify forward timed at every width
        (engine/verify_cost.py), once per engine, over a context as long as the longest prompt
        of the first batch."""
        rows = min(max(1, batch_size), len(requests))
        room = context_limit(self.model.config) - self.num_draft_tokens - 1
        # every row attends the batch's whole width: its longest prompt (rows are admitted in
        # request order), not a typical one
        widest = max(len(r.prompt_ids) for r in requests[:rows])
        context = max(1, min(widest, MAX_MEASURED_CONTEXT, room))
        costs = measure_verify_costs(self._forward, self.device, rows, context,
                                     self.num_draft_tokens)
        for tokens, ms in costs.items():
            self.budget.verify.seed(tokens, ms)
        self._costs_measured = True

    def _new_row(self, req: Request) -> Row:
        gen = None
        if req.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(req.seed)
        self._next_row_id += 1
        return Row(self._next_row_id - 1, req, list(req.prompt_ids), gen)

    def step(self, active: list[Row], cache: SlotCache, stats: SpecStats,
             first_step: bool = False) -> list[Row]:
        """One speculative step for the rows in `cache`: draft, one target pass over each row's
        last token and its draft nodes, verify, commit.  Returns the batch: rows that finished
        stay in it (and in the cache) until _turn_over retires them.  Each phase's time goes to
        stats.timing_ms (and the budget)."""
        clock = _PhaseClock()
        # a drafter that scores its nodes drafts in full and is cut by the budget afterwards
        scored = self.budget is not None and self.drafter.scores_nodes
        # planned blind, then cut again once each row's real draft is known (a verify token's
        # cost must be known for the cut to weigh it)
        recut = self.budget is not None and not scored and self.budget.verify.has_spread
        limits = None
        if self.budget:
            ids = [r.row_id for r in active]
            backlog = [(r.backlog(), r.req.max_new_tokens - r.num_new) for r in active]
            limits = (self.budget.limits_before_scoring(ids, backlog) if scored
                      else self.budget.plan(ids, recut=recut, backlog=backlog))
            # what the rows drafted for take in first (their drafter's catch-up)
            taken_in = sum(n for (n, _), k in zip(backlog, limits) if k > 0)
        with clock("draft"):
            proposal = self._propose(active, limits, count_nodes=limits is not None and not scored)
            drafted = proposal.num_nodes.sum()  # [] before any cut: what drafting paid for
            predicted = 0.0
            if scored and proposal.scores is not None:
                # what was drafted is cut to its best-scored nodes; a probe is kept as it is
                proposal, limits, predicted = self._cut_by_scores(
                    proposal, not self.budget.probing)
            elif recut and self._recut(limits):
                proposal.scores = acceptance_scores(
                    proposal, [self.budget.gains(r.row_id) for r in active])
                proposal, limits, _ = self._cut_by_scores(proposal, calibrate=False)
        with clock("verify"):
            logits, feats = self._verify_forward(active, cache, proposal)
        with clock("sample"):
            result = verify(logits, proposal, self.sampling, [r.generator for r in active])
        with clock("cache"):
            num_nodes, accepted = self._commit(active, cache, proposal, result, feats, stats)
            if self.budget:  # before finished rows are retired (and forgotten by the budget)
                # each row's longest path: a tree's tokens past it were never tried
                deepest = (proposal.depths().amax(1).tolist() if proposal.tokens.shape[1]
                           else [0] * len(active))
                for row, n, kept, d in zip(active, num_nodes, accepted, deepest):
                    self.budget.observe_row(row.row_id, n, kept, d)
                self.budget.observe_scores(predicted, sum(accepted))
        stats.num_steps += 1
        if limits is not None:
            stats.budgets.append(sum(limits))
        if self.budget:
            # the step's cost past drafting: the forward, and sampling and committing, which
            # grow with the drafts too (greedy sampling reads every fed token's logits)
            after = clock.ms["verify"] + clock.ms["sample"] + clock.ms["cache"]
            self.budget.observe_verify(self.budget.fed_tokens(num_nodes), after)
            # a first drafting also takes in the prompts, and a row the budget skipped catches
            # up on the steps it missed: neither is the cost of this step's draft tokens (taken
            # for one, a hidden-state head's catch-up made drafting look dear, so the budget
            # skipped more, so the next catch-up was longer)
            if taken_in or not first_step:
                self.budget.observe_drafting(int(drafted), clock.ms["draft"], taken_in)
        clock.add_to(stats.timing_ms)
        return active

    def _commit(self, rows: list[Row], cache: SlotCache, proposal: DraftProposal, result,
                feats, stats: SpecStats) -> tuple[list[int], list[int]]:
        """Append each row's accepted tokens, keep their slots in the cache; returns the draft
        nodes each row had and how many of them it accepted."""
        # the host decides what each row keeps and when it stops: one sync per step
        num_nodes = proposal.num_nodes.tolist()
        accepted = result.num_accepted.tolist()
        nodes_kept = result.accepted_nodes.tolist()
        out_tokens = result.tokens.tolist()
        keep = []
        for i, row in enumerate(rows):
            n_acc = accepted[i]
            path = [0] + [j + 1 for j in nodes_kept[i][:n_acc]]
            keep.append(path)
            if feats is not None:
                row.pending_hidden.append(feats[i, path])
            n_new = row.append(out_tokens[i][:n_acc + 1], self.eos_ids, self.tokenizer)
            row.accept_lengths.append(n_new)
            stats.record_step(num_nodes[i], n_new - 1 if n_new == n_acc + 1 else n_new)
        cache.commit(keep)
        return num_nodes, accepted

    def _forget(self, rows: list[Row]) -> None:
        """Finished rows leave the drafter's and the budget's books."""
        if self.drafter and rows:
            gone = [r.row_id for r in rows]
            self.drafter.release(gone)
            if self.budget:
                self.budget.forget(gone)

    # -- model calls --------------------------------------------------------------------------
    def _forward(self, cache, ids, pos, real, block_mask=None, logits_to_keep=0):
        out = cache.forward(self.target, ids, pos, real, block_mask,
                            output_hidden_states=bool(self.hidden_layers),
                            logits_to_keep=logits_to_keep)
        feats = None
        if self.hidden_layers:
            feats = torch.cat([out.hidden_states[i] for i in self.hidden_layers], dim=-1)
        return out.logits, feats

    def prefill(self, rows: list[Row], cache: SlotCache) -> None:
        """Run the prompts of `rows` (the cache's rows, in order) and commit each first token."""
        lens = [len(r.tokens) for r in rows]
        width = max(lens)
        # the prompts are host lists: padded on the host, copied to the device once
        ids = torch.full((len(rows), width), PAD, dtype=torch.long, device="cpu")
        for i, r in enumerate(rows):
            ids[i, :lens[i]] = torch.tensor(r.tokens, dtype=torch.long, device="cpu")
        ids = ids.to(self.device)
        real = ids != PAD
        pos = torch.arange(width, device=self.device).expand(len(rows), width)
        # prompts of one length end in the block's last column: only its logits are made (the
        # lm_head over a whole prompt cost as much as several of its layers)
        keep = 1 if len(set(lens)) == 1 else 0
        logits, feats = self._forward(cache, ids, pos, real, logits_to_keep=keep)
        cache.commit([list(range(n)) for n in lens])
        last = torch.tensor(lens, device=self.device) - (width if keep else 1)
        first = next_tokens(logits[torch.arange(len(rows), device=self.device), last],
                            self.sampling, [r.generator for r in rows])
        first = first.tolist()  # the host keeps each row's tokens (stop checks, detokenising)
        for i, r in enumerate(rows):
            if feats is not None:
                r.pending_hidden.append(feats[i, :lens[i]])
            r.append([first[i]], self.eos_ids, self.tokenizer)

    def _propose(self, rows: list[Row], limits: list[int] | None = None,
                 count_nodes: bool = False) -> DraftProposal:
        """limits: draft tokens per row (the speculation budget), None: num_draft_tokens each.
        Rows with limit 0 are not drafted for; their features wait for their next draft.
        count_nodes: a limit counts nodes (a tree keeps its first k, parents come before
        children), as the budget's cost model does; else it is a depth."""
        if not self.drafter:
            return DraftProposal.empty(len(rows), self.device)
        limits = limits if limits is not None else [self.num_draft_tokens] * len(rows)
        chosen = [i for i, k in enumerate(limits) if k > 0]
        if not chosen:
            return DraftProposal.empty(len(rows), self.device)
        some = [rows[i] for i in chosen]
        new = [r.new_since_last_draft() for r in some]
        starts = [r.hidden_start for r in some]
        feats = [r.take_hidden() for r in some] if self.hidden_layers else None
        inp = DraftInput(
            row_ids=[r.row_id for r in some],
            # committed tokens are host bookkeeping (as in vLLM and SGLang), so they stay on cpu
            token_ids=[r.committed_ids() for r in some],
            num_draft_tokens=max(limits[i] for i in chosen), sampling=self.sampling,
            num_new_committed=new,
            hidden_states=feats, hidden_start=starts if feats is not None else None,
            generators=[r.generator for r in some])
        proposal = _scatter_rows(self.drafter.propose(inp), chosen, len(rows))
        # never draft past a row's limit or its token budget (extra tokens could not be kept)
        room = torch.tensor([min(self.num_draft_tokens if count_nodes else k,
                                 r.req.max_new_tokens - r.num_new - 1) + 1
                             for k, r in zip(limits, rows)], device=self.device)
        proposal = _limit_depth(proposal, room)
        if count_nodes:
            first = (proposal.tokens != PAD).cumsum(dim=1) <= torch.tensor(
                limits, device=self.device)[:, None]
            proposal = proposal.select(first)
        return proposal

    def _recut(self, limits: list[int]) -> bool:
        """Whether a planned (unscored) proposal goes through the budget's cut after drafting:
        when the plan drafted, and not as a probe (that one token is kept as it is)."""
        return any(limits) and not self.budget.probing

    def _cut_by_scores(self, proposal: DraftProposal, cut: bool = True, calibrate: bool = True
                       ) -> tuple[DraftProposal, list[int], float]:
        """The budget's pick of each row's best-scored nodes (cut=False: all of them):
        (proposal, nodes kept per row, their scores summed).  calibrate: see budget.cut."""
        counts, predicted = self.budget.cut_scored(proposal.scores, proposal.tokens != PAD,
                                                   cut, calibrate)
        keep = torch.tensor(counts, dtype=torch.long, device=self.device)
        return proposal.keep_best(keep), counts, predicted

    def _verify_forward(self, rows, cache, proposal: DraftProposal):
        batch, n = proposal.tokens.shape
        last = torch.tensor([r.tokens[-1] for r in rows], dtype=torch.long, device=self.device)
        ids = torch.cat([last[:, None], proposal.tokens], dim=1)
        real = ids != PAD
        base = cache.length[:, None]
        depth = torch.cat([torch.zeros(batch, 1, dtype=torch.long, device=self.device),
                           proposal.depths()], dim=1)
        pos = base + depth
        block_mask = None if proposal.is_chain() else tree_block_mask(proposal)
        return self._forward(cache, ids, pos, real, block_mask)


class _PhaseClock:
    """Wall time per named phase of one step, in ms: `with clock("verify"): ...`."""

    def __init__(self):
        self.ms: dict[str, float] = {}
        self._start = time.perf_counter()

    def __call__(self, phase: str):
        return elapsed_ms(self.ms, phase)

    def add_to(self, timing_ms: dict) -> None:
        """Each phase's ms, and the rest of the step as "other"."""
        total = (time.perf_counter() - self._start) * 1e3
        for phase, ms in self.ms.items():
            timing_ms[phase] += ms
        timing_ms["other"] += total - sum(self.ms.values())


def acceptance_scores(proposal: DraftProposal, gains: list[list[float]]) -> torch.Tensor:
    """[batch, nodes] the chance each node is accepted, for a drafter that gives none: its row's
    chance gains[r][d - 1] that a d-deep draft token is accepted (SpeculationBudget.gains),
    split evenly among the nodes at that depth (at most one of them can be accepted), and never
    above its parent's (the order keep_best relies on); 0 on PAD."""
    depth = proposal.depths()  # [batch, nodes], 0 on PAD
    real = proposal.tokens != PAD
    same = (depth[:, :, None] == depth[:, None, :]) & real[:, None, :]  # [batch, nodes, nodes]
    device = proposal.tokens.device
    deepest = max(len(g) for g in gains) if gains else 0
    # [batch, 1 + deepest]: column d holds a d-deep node's chance (column 0 for PAD)
    table = torch.tensor([[0.0] + g + [0.0] * (deepest - len(g)) for g in gains],
                         dtype=torch.float32, device=device)
    at_depth = table.gather(1, depth.clamp(max=deepest))
    scores = at_depth / same.sum(2).clamp(min=1)
    for j in range(scores.shape[1]):  # parents precede children
        par = proposal.parents[:, j]
        above = scores.gather(1, par.clamp(min=0)[:, None])[:, 0]
        scores[:, j] = torch.where(par >= 0, torch.minimum(scores[:, j], above), scores[:, j])
    return torch.where(real, scores, torch.zeros_like(scores))


def _scatter_rows(proposal: DraftProposal, index: list[int], batch: int) -> DraftProposal:
    """The proposal of rows `index` placed among `batch` rows; the others get no nodes."""
    if len(index) == batch:
        return proposal
    n, device = proposal.tokens.shape[1], proposal.tokens.device
    tokens = torch.full((batch, n), PAD, dtype=torch.long, device=device)
    parents = torch.full((batch, n), -1, dtype=torch.long, device=device)
    where = torch.tensor(index, dtype=torch.long, device=device)
    tokens[where], parents[where] = proposal.tokens, proposal.parents
    probs = scores = None
    if proposal.draft_probs is not None:
        probs = proposal.draft_probs.new_zeros((batch,) + proposal.draft_probs.shape[1:])
        probs[where] = proposal.draft_probs
    if proposal.scores is not None:
        scores = proposal.scores.new_zeros((batch, n))
        scores[where] = proposal.scores
    return DraftProposal(tokens, parents, probs, scores)


def _limit_depth(proposal: DraftProposal, budget: torch.Tensor) -> DraftProposal:
    """Drop nodes deeper than budget - 1 (the bonus token takes the last slot)."""
    if proposal.tokens.shape[1] == 0:
        return proposal
    too_deep = proposal.depths() > (budget[:, None] - 1)
    if not too_deep.any():
        return proposal
    # compacted, so the verify block is only as wide as the longest row kept
    return proposal.select(~too_deep)
