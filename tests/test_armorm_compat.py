"""ArmoRM-style remote-code reward models: loading under transformers 5, and batched scores equal batch-1 ones.

The stand-in is a tiny random Llama whose `modeling_custom.py` (written into the model folder,
registered through config.json's `auto_map`) does what ArmoRM's published file does: it imports
`LLAMA_INPUTS_DOCSTRING` (gone from transformers 5) and decorates `forward` with
`add_start_docstrings_to_model_forward`, calls LlamaModel with the same keyword arguments, reads
its score just before the FIRST `config.pad_token_id`, and gates on the hidden state where the last
"<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n" pattern starts. The tokenizer is
the Llama-3 family's real chat template with EOS = <|eot_id|> (the Instruct release's later
tokenizer), which ends every turn, and no pad token.
"""

import dataclasses
import json
import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from wrpo_core import remote_code
from wrpo_core.config import RewardModelSpec
from wrpo_core.pipeline.runner import StageError
from wrpo_core.remote_code import RemoteCodeError, check_remote_code, transformers_imports
from wrpo_core.rewards import SequenceClassifierScorer
from wrpo_core.toy.families import FAMILIES, add_to_hub_cache, build_family_tokenizer
from wrpo_core.toy.tiny_models import tiny_llama_config

AUTO_MAP = {"AutoModelForSequenceClassification": "modeling_custom.TinyRewardModelWithGating"}
GATING_TEXT = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"

MODELING = '''"""Stand-in for ArmoRM's modeling_custom.py: the same imports, LlamaModel call, pooling and gating."""
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaModel, LlamaPreTrainedModel
from transformers.models.llama.modeling_llama import LLAMA_INPUTS_DOCSTRING
from transformers.utils import ModelOutput
from transformers.utils import add_start_docstrings_to_model_forward

GATING_PATTERN = __PATTERN__


def gating_position(ids):
    """Start of the last occurrence of GATING_PATTERN in ids."""
    n = len(GATING_PATTERN)
    for j in range(len(ids) - n, -1, -1):
        if ids[j : j + n] == GATING_PATTERN:
            return j
    raise ValueError("Token pattern not found in the list.")


@dataclass
class RewardOutput(ModelOutput):
    rewards: Optional[torch.FloatTensor] = None
    gating_output: Optional[torch.FloatTensor] = None
    score: Optional[torch.FloatTensor] = None
    logits: Optional[torch.FloatTensor] = None


class TinyRewardModelWithGating(LlamaPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.model = LlamaModel(config)
        self.num_objectives = config.to_dict().get("num_objectives", 3)
        self.regression_layer = nn.Linear(config.hidden_size, self.num_objectives, bias=False)
        self.post_init()
        transform = torch.zeros(self.num_objectives, self.num_objectives)
        transform[range(self.num_objectives), range(self.num_objectives)] = 1.0
        self.reward_transform_matrix = nn.Parameter(transform, requires_grad=False)
        self.gating = nn.ModuleList([nn.Linear(config.hidden_size, 16), nn.Linear(16, self.num_objectives)])

    @add_start_docstrings_to_model_forward(LLAMA_INPUTS_DOCSTRING)
    def forward(
        self,
        input_ids: torch.LongTensor = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[List[torch.FloatTensor]] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.FloatTensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
    ) -> RewardOutput:
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict
        outputs = self.model(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
        )
        hidden = outputs[0]
        batch_size = input_ids.shape[0]
        if self.config.pad_token_id is None and batch_size != 1:
            raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined.")
        if self.config.pad_token_id is None:
            last = -1
        else:
            last = torch.eq(input_ids, self.config.pad_token_id).int().argmax(-1) - 1
            last = (last % input_ids.shape[-1]).to(hidden.device)
        rows = torch.arange(batch_size, device=hidden.device)
        rewards = self.regression_layer(hidden[rows, last])
        gate_at = [gating_position(ids.tolist()) for ids in input_ids]
        gate = self.gating[1](F.relu(self.gating[0](hidden[rows, gate_at])))
        gating_output = F.softmax(gate / 10, dim=1)
        score = torch.sum(gating_output * (rewards @ self.reward_transform_matrix), dim=1)
        return RewardOutput(rewards=rewards, gating_output=gating_output, score=score, logits=score)
'''


def armo_tokenizer():
    """The Llama-3 family tokenizer with EOS = <|eot_id|>, the token that ends every turn; no pad token."""
    return build_family_tokenizer(dataclasses.replace(FAMILIES["llama3"], eos_token="<|eot_id|>"))


@pytest.fixture(scope="module")
def modules_cache(tmp_path_factory):
    """transformers copies remote code into HF_MODULES_CACHE: a temporary one, and sys.path restored after."""
    import transformers.dynamic_module_utils as dynamic

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path_factory.mktemp("modules")))
        patch.setattr(sys, "path", list(sys.path))
        yield dynamic.HF_MODULES_CACHE


def write_remote_model(folder: Path, tokenizer, modeling: str) -> None:
    """config.json (with auto_map), the tokenizer and `modeling` as modeling_custom.py; no weights."""
    folder.mkdir(parents=True, exist_ok=True)
    config = tiny_llama_config(tokenizer)
    config.num_labels = 1
    config.auto_map = AUTO_MAP
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    pattern = tokenizer.encode(GATING_TEXT, add_special_tokens=False)
    (folder / "modeling_custom.py").write_text(modeling.replace("__PATTERN__", repr(pattern)))


@pytest.fixture(scope="module")
def armo_dir(tmp_path_factory, modules_cache) -> str:
    """A saved stand-in ArmoRM (random weights, seed 0), loadable offline with trust_remote_code."""
    import importlib.util

    from transformers import AutoConfig

    folder = tmp_path_factory.mktemp("armo")
    write_remote_model(folder, armo_tokenizer(), MODELING)
    check_remote_code(str(folder), None, trusted=True)  # the module imports LLAMA_INPUTS_DOCSTRING
    spec = importlib.util.spec_from_file_location("armo_standin_build", folder / "modeling_custom.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = module.TinyRewardModelWithGating(AutoConfig.from_pretrained(folder))
        for parameter in model.gating.parameters():  # bolder gates, so the gating position matters
            parameter.data.normal_(0, 1.0)
    model.save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["auto_map"] == AUTO_MAP
    return str(folder)


def conversations(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """n (prompt, response) pairs of varied lengths whose text holds <|eot_id|> and <|end_of_text|> inside."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "<|eot_id|>", "gamma", "x", "delta!", "42", "y<|eot_id|>z", "<|end_of_text|>"]
    words += ["w"] * 10
    prompts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 25))) for _ in range(n)]
    responses = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 35))) for _ in range(n)]
    return prompts, responses


def scorer(path: str, batch_size: int, **spec) -> SequenceClassifierScorer:
    spec = RewardModelSpec(path=path, batch_size=batch_size, trust_remote_code=True, **spec)
    return SequenceClassifierScorer(spec, device="cpu", progress=False)


def unpadded_scores(scorer_: SequenceClassifierScorer, prompts, responses, pad_token_id=None) -> list[float]:
    """ArmoRM's own usage: one conversation at a time, no padding; pad_token_id None pools at the last token."""
    model, tokenizer = scorer_.model, scorer_.tokenizer
    saved, model.config.pad_token_id = model.config.pad_token_id, pad_token_id
    try:
        with torch.inference_mode():
            return [
                float(
                    model(
                        input_ids=torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
                    ).score
                )
                for text in scorer_._texts(prompts, responses)
            ]
    finally:
        model.config.pad_token_id = saved


def test_the_removed_names_are_really_missing(armo_dir, tmp_path):
    """Without the compatibility layer the stand-in fails at import, as ArmoRM does under transformers 5."""
    import transformers.models.llama.modeling_llama as modeling_llama

    assert "LLAMA_INPUTS_DOCSTRING" not in Path(modeling_llama.__file__).read_text()
    load = (
        "from transformers import AutoModelForSequenceClassification as A\n"
        f"A.from_pretrained({armo_dir!r}, trust_remote_code=True)\n"
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", load], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "ImportError: cannot import name 'LLAMA_INPUTS_DOCSTRING'" in done.stderr


def test_batched_scores_equal_batch_one_and_armorm_usage(armo_dir):
    prompts, responses = conversations(40)
    one, eight = scorer(armo_dir, 1), scorer(armo_dir, 8)
    assert one.remote_code_stand_ins == ["transformers.models.llama.modeling_llama.LLAMA_INPUTS_DOCSTRING"]
    a, b = one.score(prompts, responses), eight.score(prompts, responses)
    reference = unpadded_scores(eight, prompts, responses)
    assert b == pytest.approx(a, abs=1e-5)
    assert b == pytest.approx(reference, abs=1e-5)
    assert len({round(x, 6) for x in b}) == 40

    # The pad id is no token of any conversation (EOS = <|eot_id|> ends every turn), and the model pools by it.
    tokenizer = eight.tokenizer
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in eight._texts(prompts, responses)]
    assert all(tokenizer.eos_token_id in row for row in rows)
    assert len({len(row) for row in rows}) > 20 and eight.pad_token_id == eight.model.config.pad_token_id
    assert not any(eight.pad_token_id in row for row in rows)

    # The check can fail: pooling at the first EOS (what an EOS pad did) gives other scores for every row.
    at_first_eos = unpadded_scores(eight, prompts, responses, pad_token_id=tokenizer.eos_token_id)
    assert sum(abs(x - y) > 1e-4 for x, y in zip(at_first_eos, reference, strict=True)) == 40


def test_loads_from_the_hub_cache_at_a_revision(armo_dir, tmp_path, monkeypatch):
    """A hub id: the remote module is read from the hub cache at the spec's revision."""
    import huggingface_hub.constants

    add_to_hub_cache(armo_dir, tmp_path / "hub", "org/armo", commit="c" * 40, refs=("v1",))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    prompts, responses = conversations(6, seed=1)
    from_hub = scorer("org/armo", 4, revision="v1")
    assert from_hub.remote_code_stand_ins == [
        "transformers.models.llama.modeling_llama.LLAMA_INPUTS_DOCSTRING"
    ]
    assert from_hub.score(prompts, responses) == pytest.approx(
        scorer(armo_dir, 1).score(prompts, responses), abs=1e-5
    )


def test_trust_remote_code_is_still_required(armo_dir):
    """Without it transformers would load its own Llama classifier (random head): refused, naming the setting."""
    spec = RewardModelSpec(path=armo_dir, trust_remote_code=False)
    with pytest.raises(RemoteCodeError, match="set `trust_remote_code: true` on reward_model"):
        SequenceClassifierScorer(spec, device="cpu", progress=False)


@pytest.mark.parametrize(
    ("imports", "named"),
    [
        ("from transformers.models.llama.modeling_llama import LlamaModel, LlamaGoneAttention",
         "transformers.models.llama.modeling_llama.LlamaGoneAttention (modeling_custom.py:2)"),
        ("from transformers.models.gone_model import GONE_INPUTS_DOCSTRING",
         "transformers.models.gone_model.GONE_INPUTS_DOCSTRING (modeling_custom.py:2)"),
        ("import transformers.models.gone_model", "transformers.models.gone_model (modeling_custom.py:2)"),
    ],
)  # fmt: skip
def test_another_missing_name_is_a_permanent_error(tmp_path, modules_cache, imports, named):
    modeling = f'"""A remote module importing a name transformers does not have."""\n{imports}\n'
    write_remote_model(tmp_path / "rm", armo_tokenizer(), modeling)
    with pytest.raises(RemoteCodeError) as caught:
        scorer(str(tmp_path / "rm"), 1)
    message = str(caught.value)
    assert named in message and "supported under transformers 5.20.2 and 5.24.0" in message
    assert StageError("score", "rm", caught.value).permanent


def test_a_failed_remote_import_is_permanent(tmp_path, modules_cache):
    """An ImportError the layer does not foresee (a package the code needs is missing) is not retried."""
    write_remote_model(tmp_path / "rm", armo_tokenizer(), "import wrpo_no_such_package\n")
    with pytest.raises(
        RemoteCodeError, match=r"its remote code failed to import: .*wrpo_no_such_package"
    ) as caught:
        scorer(str(tmp_path / "rm"), 1)
    assert StageError("score", "rm", caught.value).permanent


def test_relative_imports_are_followed_and_guarded_imports_skipped(tmp_path, modules_cache):
    write_remote_model(tmp_path / "rm", armo_tokenizer(), "from .helpers import x\n")
    (tmp_path / "rm" / "helpers.py").write_text(
        "try:\n    from transformers.utils import gone_optional_helper\nexcept ImportError:\n    pass\n"
        "from transformers.utils import GONE_START_DOCSTRING\nx = 1\n"
    )
    assert [
        n.name for n in transformers_imports((tmp_path / "rm" / "helpers.py").read_text(), "helpers.py")
    ] == ["GONE_START_DOCSTRING"]
    supplied = check_remote_code(str(tmp_path / "rm"), None, trusted=True)
    assert supplied == ["transformers.utils.GONE_START_DOCSTRING"]
    import transformers.utils

    assert transformers.utils.GONE_START_DOCSTRING == ""


def test_stand_ins_are_set_once_and_only_when_missing(armo_dir, caplog):
    import transformers.models.llama.modeling_llama as modeling_llama
    import transformers.utils

    decorator = transformers.utils.add_start_docstrings_to_model_forward
    with caplog.at_level(logging.INFO, logger=remote_code.__name__):
        first = check_remote_code(armo_dir, None, trusted=True)
        second = check_remote_code(armo_dir, None, trusted=True)
    assert first == second == ["transformers.models.llama.modeling_llama.LLAMA_INPUTS_DOCSTRING"]
    assert modeling_llama.LLAMA_INPUTS_DOCSTRING == ""
    assert not [
        r for r in caplog.records if "LLAMA_INPUTS_DOCSTRING" in r.getMessage()
    ]  # logged at first use
    assert transformers.utils.add_start_docstrings_to_model_forward is decorator  # present: left alone
    assert remote_code.stand_in_for("replace_return_docstrings")(output_type=None)(len) is len
    assert remote_code.stand_in_for("LlamaModel") is None


@pytest.mark.integration
def test_on_ray_a_reward_model_that_cannot_load_fails_once_as_permanent(tmp_path, modules_cache, caplog):
    """The Ray path: the load error leaves the actor with its type (it used to be a dead actor, retried
    three times and reported as "possibly transient"), fails the shard at once, and the stage is permanent."""
    ray = pytest.importorskip("ray")
    from wrpo_core import fanout
    from wrpo_core.config import ComputeConfig
    from wrpo_core.schemas import SAMPLES
    from wrpo_core.storage import Storage

    modeling = '"""ArmoRM-like code on a transformers without its base class."""\n'
    modeling += "from transformers.models.llama.modeling_llama import LlamaGoneAttention\n"
    write_remote_model(tmp_path / "rm", armo_tokenizer(), modeling)
    storage = Storage.open(str(tmp_path / "store"))
    samples = pa.table({
        "prompt_id": ["p0"], "model": ["m"], "sample_index": pa.array([0], pa.int32()), "text": ["hi"],
        "finish_reason": ["stop"], "prompt_tokens": pa.array([3], pa.int32()),
        "completion_tokens": pa.array([1], pa.int32()), "seed": pa.array([7], pa.int64()),
    })  # fmt: skip
    storage.write_table("samples/part-00000.parquet", samples, SAMPLES)
    prompts = pa.table({"prompt_id": ["p0"], "prompt": ["say hi"]})
    spec = RewardModelSpec(path=str(tmp_path / "rm"), trust_remote_code=True)
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        with (
            caplog.at_level(logging.WARNING, logger="wrpo_core.fanout"),
            pytest.raises(fanout.ShardError) as caught,
        ):
            fanout.score_model(
                spec, prompts, storage.access(), [fanout.Shard(0, 0, 1, "samples/part-00000.parquet")],
                "scores", ComputeConfig(num_cpus_per_actor=1),
            )  # fmt: skip
    finally:
        ray.shutdown()
    message = str(caught.value)
    assert "shard 0" in message and "RemoteCodeError" in message and "LlamaGoneAttention" in message
    assert caught.value.permanent and StageError("score", "rm", caught.value).permanent
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]  # failed once, not three times
