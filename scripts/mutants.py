"""One-line breaks of the paper's mechanisms, each of which some test must notice (STYLE.md, point 12).

Each mutant replaces one piece of one line (it must occur exactly once in its file) and names the test
files that guard it. The script copies the repository's tracked files once into a scratch folder (so the
CPU kernel is built once, and the working tree is never touched), applies one mutant at a time there, runs
pytest on the guarding files until the first failure, and restores the file. A mutant whose tests all
pass *survives*: a mechanism no test guards. Exit status 1 if any survives.

    python scripts/mutants.py              # every mutant (about 15 minutes on 2 cores)
    python scripts/mutants.py -k denoising # those whose name contains a word
    python scripts/mutants.py --list
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    before: str
    after: str
    tests: tuple[str, ...]


M = Mutant
MUTANTS = [
    # --- Hungarian matching (DETR Sec. 3.1; DINO Sec. 4.1) -----------------------------------------------
    M("matching: L1 cost squared", "matcher.py", "- targets[:, None]).abs().sum(-1)",
      "- targets[:, None]).square().sum(-1)", ("tests/test_matcher.py",)),
    M("matching: class cost sign flipped", "matcher.py", "cost_class * (positive - negative)",
      "cost_class * (negative - positive)", ("tests/test_matcher.py",)),
    M("matching: GIoU rewarded the wrong way", "matcher.py", "- cost_giou * giou", "+ cost_giou * giou",
      ("tests/test_matcher.py",)),
    M("matching: softmax class probabilities", "matcher.py", "probs = logits.sigmoid().gather(",
      "probs = logits.softmax(-1).gather(", ("tests/test_matcher.py",)),
    M("matching: focal alpha on the wrong side", "matcher.py", "positive = alpha * (1 - probs)",
      "positive = (1 - alpha) * (1 - probs)", ("tests/test_matcher.py",)),
    # --- contrastive denoising (Sec. 3.3) ------------------------------------------------------------------
    M("denoising: positives get the far band, negatives the near one", "denoising.py",
      "negative, obj = within >= step, within % step", "negative, obj = within < step, within % step",
      ("tests/test_denoising.py",)),
    M("denoising: negatives get no extra noise", "denoising.py",
      "magnitude = torch.rand_like(boxes_cxcywh) + negative[..., None].to(boxes_cxcywh.dtype)",
      "magnitude = torch.rand_like(boxes_cxcywh)", ("tests/test_denoising.py",)),
    M("denoising: noise scaled by the full size", "denoising.py", "half_wh = torch.cat([boxes_cxcywh[..., 2:]] * 2, -1) / 2",
      "half_wh = torch.cat([boxes_cxcywh[..., 2:]] * 2, -1)", ("tests/test_denoising.py",)),
    M("denoising: matching queries see the DN queries", "denoising.py", "attn_mask[num_dn:, :num_dn] = True",
      "attn_mask[num_dn:, :num_dn] = False", ("tests/test_denoising.py",)),
    M("denoising: groups see each other", "denoising.py", "group[:, None] != group[None, :]",
      "group[:, None] == group[None, :]", ("tests/test_denoising.py",)),
    M("denoising: half as many groups", "denoising.py", "num_groups = (dn_number // step).clamp(min=1)",
      "num_groups = (dn_number // (2 * step)).clamp(min=1)", ("tests/test_denoising.py",)),
    M("denoising: labels flipped twice as often", "denoising.py", "< label_noise_ratio * 0.5",
      "< label_noise_ratio", ("tests/test_denoising.py",)),
    M("denoising: positives looked up in the wrong slots", "denoising.py",
      "target_index = torch.where(real & ~negative, obj, -1)", "target_index = torch.where(real & negative, obj, -1)",
      ("tests/test_denoising.py", "tests/test_losses.py")),
    M("denoising: the unused slots are seen by the groups", "denoising.py",
      "attn_mask[:num_dn, :num_dn] = group[:, None] != group[None, :]",
      "attn_mask[:num_dn, :num_dn] = (group[:, None] != group[None, :]) & trained[None, :]",
      ("tests/test_denoising.py",)),
    M("denoising: the unused slots trained as no object", "losses.py", "focal = focal * trained[:, None]",
      "focal = focal * 1", ("tests/test_losses.py",)),
    M("denoising: the decoder ignores the attention mask", "model.py", "attn_mask=self_attn_mask, need_weights",
      "attn_mask=None, need_weights", ("tests/test_denoising.py",)),
    # --- mixed query selection (Sec. 3.4) ------------------------------------------------------------------
    M("query selection: the worst proposals", "model.py", "topk = logits.max(-1)[0].topk(Q, dim=1)[1]",
      "topk = (-logits.max(-1)[0]).topk(Q, dim=1)[1]", ("tests/test_model.py",)),
    M("query selection: anchors not detached", "model.py", "return content, anchors_unsig.detach(), interm",
      "return content, anchors_unsig, interm", ("tests/test_model.py",)),
    M("query selection: proposals not refined by the encoder's box head", "model.py",
      "boxes_unsig = self.enc_box_head(memory) + proposals", "boxes_unsig = self.enc_box_head(memory) * 0 + proposals",
      ("tests/test_model.py",)),
    M("query selection: proposal sizes do not grow with the level", "model.py",
      "torch.full_like(centres, 0.05 * 2.0 ** lvl)", "torch.full_like(centres, 0.05)", ("tests/test_model.py",)),
    M("query selection: border tokens stay valid", "model.py", "inside.append(((n < hundredfold) & (hundredfold < 99 * n)).all(-1))",
      "inside.append(((n < hundredfold) & (hundredfold < 99 * n)).any(-1))", ("tests/test_model.py",)),
    # --- the decoder: look forward twice (Sec. 3.5) ---------------------------------------------------------
    M("decoder: the next layer starts from undetached boxes", "model.py",
      "box = box_with_grad.detach()  # b_i", "box = box_with_grad  # b_i", ("tests/test_model.py",)),
    M("decoder: look forward once only", "model.py", "box_with_grad = update_box(box, box_head(query))  # b'_i",
      "box_with_grad = update_box(box, box_head(query)).detach()  # b'_i", ("tests/test_model.py",)),
    M("decoder: supervised boxes refine the detached box", "model.py",
      "supervised_boxes.append(update_box(box_with_grad, box_head(hidden)))",
      "supervised_boxes.append(update_box(box, box_head(hidden)))", ("tests/test_model.py",)),
    M("decoder: no final norm on the hidden states", "model.py", "hidden = self.norm(query)", "hidden = query",
      ("tests/test_model.py",)),
    M("decoder: box offsets not scaled by the half box", "deformable_attn.py",
      "offsets / P * reference_points[:, :, None, :, None, 2:] * 0.5",
      "offsets / P * reference_points[:, :, None, :, None, 2:]", ("tests/test_deformable_attn.py",)),
    # --- the losses (Sec. 4.1; DETR Eq. 2) -----------------------------------------------------------------
    M("loss: focal alpha on the wrong side", "losses.py", "sigmoid_focal_loss(logits, onehot, alpha=alpha, gamma=gamma)",
      "sigmoid_focal_loss(logits, onehot, alpha=1 - alpha, gamma=gamma)", ("tests/test_losses.py",)),
    M("loss: GIoU averaged instead of normalised by the objects", "losses.py",
      "giou.sum((1, 2))], -1) / num_boxes", "giou.mean((1, 2)) * num_boxes], -1) / num_boxes",
      ("tests/test_losses.py",)),
    M("loss: GIoU penalty from the intersection", "losses.py", "(iou - (enclosing - union) / (enclosing + eps))",
      "(iou - (enclosing - inter) / (enclosing + eps))", ("tests/test_losses.py",)),
    M("loss: DN terms not normalised by the groups", "losses.py", "known, num_boxes * dn.num_groups, dn.trained",
      "known, num_boxes, dn.trained", ("tests/test_losses.py",)),
    M("loss: box weight given to GIoU", "losses.py", "(cfg.cls_loss_coef, cfg.bbox_loss_coef, cfg.giou_loss_coef)",
      "(cfg.cls_loss_coef, cfg.giou_loss_coef, cfg.giou_loss_coef)", ("tests/test_losses.py",)),
    M("loss: the encoder's proposals unsupervised", "losses.py",
      "return ([(\"\", outputs), (\"_interm\", outputs[\"interm_outputs\"])]", "return ([(\"\", outputs)]",
      ("tests/test_losses.py",)),
    M("loss: at least one object not enforced", "losses.py", "num_boxes = num_boxes.clamp(min=1)",
      "num_boxes = num_boxes.clamp(min=0.5)", ("tests/test_losses.py",)),
    M("matching: padding slots assigned", "matcher.py", "linear_sum_assignment(host[s, b, :, :n])",
      "linear_sum_assignment(host[s, b])", ("tests/test_matcher.py", "tests/test_losses.py")),
    # --- the training step ----------------------------------------------------------------------------------
    M("step: gradients not checked", "appendix/safe_step.py",
      "finite &= torch.isfinite(norm)", "finite &= True", ("tests/test_train.py",)),
    M("step: a skipped step never reported", "appendix/safe_step.py", "if skipped is not None and skipped.item():", "if False:",
      ("tests/test_train.py",)),
    M("step: compiled targets padded to the batch", "train.py", "for t in targets), cfg.compile))",
      "for t in targets), False))", ("tests/test_compile.py",)),
    # --- the data checks and targets -----------------------------------------------------------------------
    M("data: x2 clipped to the height", "data.py", "min(x + w, img[\"width\"])", "min(x + w, img[\"height\"])",
      ("tests/test_data.py",)),
    M("data: negative heights accepted", "data.py", "if w < 0 or h < 0:", "if w < 0:", ("tests/test_data.py",)),
    M("data: a box on the image's edge is kept", "data.py", "if x2 <= x1 or y2 <= y1:", "if x2 < x1 or y2 < y1:",
      ("tests/test_data.py",)),
    M("data: crowd regions become targets", "data.py", "if not a.get(\"iscrowd\", 0)]", "if True]",
      ("tests/test_data.py",)),
    M("data: targets normalised by (h, w)", "data.py", "/ torch.tensor([w, h, w, h])", "/ torch.tensor([h, w, h, w])",
      ("tests/test_data.py",)),
    M("data: one class too few", "data.py", "return max(self.coco.cats, default=0) + 1",
      "return max(self.coco.cats, default=0)", ("tests/test_data.py",)),
    M("data: duplicate annotation ids accepted", "data.py", "if entry[\"id\"] in seen:", "if False:",
      ("tests/test_data.py",)),
    M("layouts: VOC pixels read as 0-based", "appendix/layouts.py", '"bbox": [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]',
      '"bbox": [xmin, ymin, xmax - xmin, ymax - ymin]', ("tests/test_layouts.py",)),
    M("layouts: VOC difficult objects trained on", "appendix/layouts.py", '"iscrowd": int(obj["difficult"])', '"iscrowd": 0',
      ("tests/test_layouts.py",)),
    M("layouts: YOLO boxes scaled by (H, W)", "appendix/layouts.py", "[x1 * W, y1 * H, (x2 - x1) * W, (y2 - y1) * H]",
      "[x1 * H, y1 * W, (x2 - x1) * H, (y2 - y1) * W]", ("tests/test_layouts.py",)),
    M("layouts: YOLO centre taken for the corner", "appendix/layouts.py", "x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2",
      "x1, y1, x2, y2 = cx, cy, cx + w, cy + h", ("tests/test_layouts.py",)),
    # --- post-processing ------------------------------------------------------------------------------------
    M("postprocess: query and class swapped", "model.py", "query, labels = index // K, index % K",
      "query, labels = index % K, index // K", ("tests/test_model.py",)),
    M("postprocess: boxes scaled by (h, w)", "model.py", "size = torch.stack([w, h, w, h], 1)[:, None]",
      "size = torch.stack([h, w, h, w], 1)[:, None]", ("tests/test_model.py",)),
    M("postprocess: softmax scores", "model.py", "scores, index = logits.sigmoid().reshape",
      "scores, index = logits.softmax(-1).reshape", ("tests/test_model.py",)),
    # --- sliced inference (SAHI, arXiv 2202.06934) ------------------------------------------------------------
    M("slicing: tile offsets (y, x)", "appendix/inference.py", "torch.tensor([x1, y1, x1, y1]", "torch.tensor([y1, x1, y1, x1]",
      ("tests/test_inference.py",)),
    M("slicing: tile boxes left in the tile's pixels", "appendix/inference.py", "tile.boxes = tile.boxes + torch.tensor",
      "tile.boxes = tile.boxes + 0 * torch.tensor", ("tests/test_inference.py",)),
    M("slicing: no whole-image pass", "appendix/inference.py", "found = [self.named(self.run([image])[0], image, source, score_thr)]",
      "found = [self.named(self.run([image])[0], image, source, 2.0)]", ("tests/test_inference.py",)),
    M("slicing: the last tile does not reach the edge", "appendix/inference.py", "size - overlap)) + [length - size]",
      "size - overlap))", ("tests/test_inference.py",)),
    M("slicing: merged over the larger box (IoU-like)", "appendix/inference.py", "inter / torch.minimum(area[i], area)",
      "inter / torch.maximum(area[i], area)", ("tests/test_inference.py",)),
    M("slicing: the kept box does not grow to the union", "appendix/inference.py",
      "kept_boxes.append(torch.cat([b[group, :2].amin(0), b[group, 2:].amax(0)]))", "kept_boxes.append(b[i])",
      ("tests/test_inference.py",)),
    M("slicing: classes merged together", "appendix/inference.py", "index = (labels == label).nonzero().flatten()",
      "index = (labels == labels).nonzero().flatten()", ("tests/test_inference.py",)),
    # --- export: the attention as gathers, the check, INT8 -----------------------------------------------------
    M("gather attention: pixel coordinates not shifted by half a pixel", "msda_cuda/gather.py",
      "x, y = xy[..., 0] * W - 0.5, xy[..., 1] * H - 0.5", "x, y = xy[..., 0] * W, xy[..., 1] * H - 0.5",
      ("tests/test_deformable_attn.py",)),
    M("gather attention: the last column counts as outside", "msda_cuda/gather.py", "(cx <= W - 1)", "(cx < W - 1)",
      ("tests/test_deformable_attn.py",)),
    M("gather attention: corners outside the map not zeroed", "msda_cuda/gather.py",
      "* bilinear * inside).view", "* bilinear).view", ("tests/test_deformable_attn.py",)),
    M("gather attention: rows of the wrong head", "msda_cuda/gather.py",
      "index = ((batch_rows + tokens.flatten(3)) * M + heads)", "index = ((batch_rows + tokens.flatten(3)) * M)",
      ("tests/test_deformable_attn.py",)),
    M("export check: the runtime's selection taken on trust", "appendix/export.py",
      "agrees = selection_gap <= tol and matched == required", "agrees = matched == required",
      ("tests/test_export.py",)),
    M("export check: every detection forgiven as tied", "appendix/export.py",
      "keep = want[0][b] > want[0][b, -1] + tol", "keep = want[0][b] > want[0][b, 0] + tol",
      ("tests/test_export.py",)),
    M("export check: AP differences not gated", "appendix/export.py",
      "if abs(value - ap[\"PyTorch\"]) > most and", "if abs(value - ap[\"PyTorch\"]) > 1 + most and",
      ("tests/test_export.py",)),
    M("int8: the box head quantised too", "appendix/export.py",
      "and not any(part in node.name for part in KEPT_FLOAT)]", "]", ("tests/test_export.py",)),
    # --- a run's bookkeeping: the end of an epoch, the EMA, what changes every epoch (issue 33) ---------------
    M("epoch end: marked done before best.pth", "train.py", '    if best:\n        save_atomically(checkpoint, setup.output_dir / "best.pth")',
      '    save_atomically(checkpoint, setup.checkpoint_path)\n    if best:\n        save_atomically(checkpoint, setup.output_dir / "best.pth")',
      ("tests/test_resilience.py",)),
    M("epoch end: a redone epoch's record repeated in the log", "train.py", 'if json.loads(line)["epoch"] < record["epoch"]]',
      'if json.loads(line)["epoch"] < record["epoch"] + 1]', ("tests/test_resilience.py",)),
    M("ema: no warm-up of the decay", "train.py", "decay * (1 - torch.exp(-steps.double() / EMA_WARMUP))",
      "decay * torch.ones_like(steps.double())", ("tests/test_train.py",)),
    M("ema: its step count not restored", "appendix/runs.py", 'self.ema.n_averaged.fill_(checkpoint.get("ema_updates") or EMA_WARMED_UP)',
      "pass", ("tests/test_train.py",)),
    M("epochs: the same order every epoch", "appendix/runs.py", "manual_seed(self.seed + self.epoch)).tolist()",
      "manual_seed(self.seed)).tolist()", ("tests/test_runs.py",)),
    M("epochs: the same augmentations every epoch", "appendix/runs.py", "yield index, (self.seed * 1_000_003 + self.epoch) * 1_000_003 + index",
      "yield index, self.seed * 1_000_003 + index", ("tests/test_runs.py",)),
    M("data: augmentation blind to the sample's seed", "data.py", "                torch.manual_seed(seed)\n",
      "                torch.manual_seed(0)\n", ("tests/test_runs.py",)),
    M("disk full: torch's own error let through", "appendix/runs.py", "raise e.__context__ from None", "raise",
      ("tests/test_runs.py",)),
    # --- detections among the checkpoint's categories (issue 33) ------------------------------------------------
    M("categories: the rows that are no category reported", "model.py", "logits = logits.index_select(-1, classes)",
      "pass", ("tests/test_model.py",)),
    M("categories: the API detects every class", "appendix/inference.py", "self.classes = detected_classes(categories, cfg.num_classes)",
      "self.classes = None", ("tests/test_inference.py",)),
    M("categories: eval.py detects every class", "eval.py", "postprocess(outputs, sizes, num_select, classes=classes)",
      "postprocess(outputs, sizes, num_select)", ("tests/test_eval.py",)),
    M("categories: training evaluates every class", "train.py", "detected_classes(setup.train_set.category_names, setup.cfg.num_classes)) or {}",
      "None) or {}", ("tests/test_train.py",)),
    M("categories: the exported file reports every class", "appendix/export.py", "orig_sizes, self.num_select, True, self.classes)",
      "orig_sizes, self.num_select, True, None)", ("tests/test_export.py",)),
    M("metrics: a class without objects gets AP 0", "eval.py", "{name: 0.0 if c in present else None for",
      "{name: 0.0 for", ("tests/test_plots.py",)),
    M("layouts: VOC corners swapped accepted", "appendix/layouts.py", "            if a > b:\n", "            if False:\n",
      ("tests/test_layouts.py",)),
    M("slicing: tiles of any size", "appendix/inference.py", "slice < MIN_TILE):", "slice < 2):", ("tests/test_inference.py",)),
    M("slicing: any overlap", "appendix/inference.py", "if not 0 <= overlap <= MAX_OVERLAP:", "if not 0 <= overlap < 1:",
      ("tests/test_inference.py",)),
    # --- the pictures of the paper's mechanisms: their data path ----------------------------------------------
    M("explain: each level's scores read at the previous level's offset", "appendix/explain.py",
      "self.token_scores.split(sizes)", "self.token_scores.roll(sizes[-1]).split(sizes)", ("tests/test_explain.py",)),
    M("explain: the first decoder layer's sampling drawn", "appendix/explain.py",
      "sampling_recorded(model.decoder.layers[-1].cross_attn", "sampling_recorded(model.decoder.layers[0].cross_attn",
      ("tests/test_explain.py",)),
    M("explain: the neighbouring query's boxes drawn", "appendix/explain.py",
      'layers = [aux["pred_boxes"][0, query] for', 'layers = [aux["pred_boxes"][0, query - 1] for',
      ("tests/test_explain.py",)),
    M("explain: a detection's query taken by the farthest box", "appendix/explain.py",
      ".abs().amax(-1).argmin())", ".abs().amax(-1).argmax())", ("tests/test_explain.py",)),
    M("explain: the negatives drawn as the positives", "appendix/explain.py",
      "return (dn.boxes[0, :objects], dn.boxes[0, objects:2 * objects],",
      "return (dn.boxes[0, objects:2 * objects], dn.boxes[0, :objects],", ("tests/test_explain.py",)),
]


def copy_repository(into: Path) -> None:
    """The tracked files (and the untracked ones git does not ignore) of the repository, into `into`."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, into / name)


def apply(text: str, mutant: Mutant) -> str:
    """`text` with the mutant's one replacement; a ValueError if its `before` is not there exactly once."""
    count = text.count(mutant.before)
    if count != 1:
        raise ValueError(f"mutant {mutant.name!r}: {mutant.before!r} occurs {count} times in {mutant.file}, "
                         f"not once: update the mutant to the code")
    mutated = text.replace(mutant.before, mutant.after)
    compile(mutated, mutant.file, "exec")  # a break of the code's meaning, never of its syntax
    return mutated


def run_tests(folder: Path, mutant: Mutant, timeout: float) -> tuple[bool, str]:
    """(killed, how): pytest on the mutant's test files in `folder`, stopping at the first failure."""
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not cuda", *mutant.tests]
    try:
        # the kernels' builds of the scratch copy in a cache of its own: sharing torch's, they would replace
        # the working tree's builds (same names, other source paths), and each side would rebuild them
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "TORCH_EXTENSIONS_DIR": str(folder / ".torch_extensions")}
        done = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return True, "timed out"
    failed = [line for line in done.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    if done.returncode == 0:
        return False, "every test passed"
    return True, (failed[0] if failed else done.stdout.strip().splitlines()[-1])[:110]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", dest="word", help="only the mutants whose name contains this")
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per mutant (default 600)")
    args = parser.parse_args()
    mutants = [m for m in MUTANTS if not args.word or args.word in m.name]
    try:
        for m in mutants:  # every mutant must still fit the code before anything runs
            apply((ROOT / m.file).read_text(), m)
    except ValueError as e:
        sys.exit(f"{parser.prog}: {e}")
    if args.list:
        for m in mutants:
            print(f"{m.name:70s} {m.file:20s} {' '.join(m.tests)}")
        return
    start, survivors = time.time(), []
    with tempfile.TemporaryDirectory(prefix="dino-mutants-") as scratch:
        folder = Path(scratch)
        copy_repository(folder)
        for i, m in enumerate(mutants, 1):
            path = folder / m.file
            original = path.read_text()
            path.write_text(apply(original, m))
            t = time.time()
            try:
                killed, how = run_tests(folder, m, args.timeout)
            finally:
                path.write_text(original)
            print(f"[{i:2d}/{len(mutants)}] {'killed  ' if killed else 'SURVIVED'} {m.name} ({time.time() - t:.0f} s): "
                  f"{how}", flush=True)
            if not killed:
                survivors.append(m.name)
    print(f"{len(survivors)} survivors out of {len(mutants)} mutants, in {time.time() - start:.0f} s"
          + (": " + "; ".join(survivors) if survivors else ""))
    sys.exit(1 if survivors else 0)


if __name__ == "__main__":
    main()
