"""The rollout layer: prompts -> sampler engine -> scored rollouts -> advantages -> batches.

    prompts.py     PromptStream (training order), encode_prompt(s) (chat template or plain text)
    engine.py      SamplerEngine protocol, build_engine("hf" | "vllm")
    sampler.py     the "hf" engine: KV-cache sampler on the transformers model
    log_probs.py   full-forward log-probs (the trainer's pi_theta and pi_old)
    reference.py   trainer-precision copy of the sampling weights (engine mismatch, routing flips)
    generate.py    generate_and_score: the one generate-and-score path (sync source and Ray workers)
    advantages.py  group advantages
    batch.py       Rollout (ragged, what engines return and Ray carries), RolloutBatch (padded tensors)
    metrics.py     reward, staleness, mismatch and log W split metrics
    source.py      RolloutSource protocol, the synchronous source (staleness N)
    ray_source.py  the asynchronous source on Ray actors; ray_utils.py starts and stops Ray

Nothing here imports the trainer (:mod:`vespo.train`); the trainer passes plain settings.
"""

from vespo.rollout.batch import Rollout, RolloutBatch
from vespo.rollout.engine import EngineError, SamplerEngine, build_engine
from vespo.rollout.generate import RolloutSettings, generate_and_score
from vespo.rollout.source import RolloutSource, RolloutSourceError, SyncRolloutSource

__all__ = [
    "EngineError",
    "Rollout",
    "RolloutBatch",
    "RolloutSettings",
    "RolloutSource",
    "RolloutSourceError",
    "SamplerEngine",
    "SyncRolloutSource",
    "build_engine",
    "generate_and_score",
]
