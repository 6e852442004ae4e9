"""Layer selection tools on a tiny target: the final layer agrees with itself, the numbers are
the ones a direct computation gives, and the CLI writes the JSON and the plot."""
import json
import os

import torch

from specplug.models.tiny import build_tiny_llama, build_tiny_tokenizer, save_model
from specplug.training.layer_stats import layer_stats


def test_final_layer_is_its_own_best_exit():
    model = build_tiny_llama(seed=1, layers=3).float()
    seqs = [[5, 6, 7, 8, 9], [20, 30, 40]]
    stats = layer_stats(model, seqs)
    assert stats["layers"] == [0, 1, 2, 3] and stats["num_tokens"] == 6
    assert abs(stats["cosine_to_final"][3] - 1.0) < 1e-6
    assert stats["early_exit_top1_agreement"][3] == 1.0
    # the final exit's CE is the model's own next-token loss
    with torch.no_grad():
        want = sum(torch.nn.functional.cross_entropy(model(torch.tensor([s])).logits[0, :-1],
                                                     torch.tensor(s[1:]), reduction="sum")
                   for s in seqs) / 6
    assert abs(stats["early_exit_ce"][3] - float(want)) < 1e-4
    assert all(-1.0 <= c <= 1.0 for c in stats["cosine_to_final"])


def test_cli_writes_json_and_plot(tmp_path):
    from specplug.training.cli import main
    from specplug.training.data import DataConfig, generate_data
    target = save_model(build_tiny_llama(seed=1, layers=3), build_tiny_tokenizer(),
                        str(tmp_path / "t"))
    data = str(tmp_path / "d")
    generate_data(DataConfig(target, data, prompts_per_chunk=2, batch_size=2, max_new_tokens=5,
                             dtype="float32", prompt_ids=[[4, 5, 6], [7, 8, 9, 10]]), progress=False)
    out = str(tmp_path / "stats")
    assert main(["layer-stats", "--target", target, "--data", data, "--output", out]) == 0
    stats = json.load(open(os.path.join(out, "layer_stats.json")))
    assert stats["num_tokens"] == (3 + 5 - 1) + (4 + 5 - 1) - 2  # the last token has no feature row
    assert os.path.getsize(os.path.join(out, "layer_stats.png")) > 1000
