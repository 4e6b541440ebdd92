"""Overrides that make a training run take seconds: the shared base of the end-to-end tests."""

TINY_RUN = [
    "model.hidden_size=32",
    "model.num_layers=2",
    "model.num_heads=2",
    "task.params={min_terms: 2, max_terms: 2, min_digits: 1, max_digits: 1}",
    "task.train_size=200",
    "sampling.group_size=4",
    "sampling.max_new_tokens=8",
    "algorithm.mini_batch_prompts=2",
    "eval.num_prompts=4",
    "eval.avg_k=1",
    "eval.every=100",
    "checkpoint.every=100",
    "logging.tensorboard=false",
]

#: the quiet end of the engine tests' runs (async and vLLM): on-policy, a large lr so weights move,
#: no eval or checkpoint until the end, no progress bar, one thread
QUIET_ON_POLICY = [
    "algorithm.staleness=1",
    "optim.lr=0.01",
    "eval.num_prompts=2",
    "eval.avg_k=1",
    "eval.every=1000",
    "eval.at_start=false",
    "checkpoint.every=1000",
    "logging.progress=false",
    "logging.tensorboard=false",
    "run.threads=1",
]


def length_parity_reward(response: str, example: object) -> float:
    """A reward that splits every group even for an untrained model: 1 for an even-length response."""
    return float(len(response) % 2 == 0)


def text_hash_reward(response: str, example: object) -> float:
    """1 for half of all distinct texts (a CRC bit): any group of distinct responses is likely split,
    whatever their lengths, and the reward is deterministic across processes."""
    import zlib

    return float(zlib.crc32(response.encode()) & 1)


def zero_reward(response: str, example: object) -> float:
    """0 for every response: every group is all-equal, every advantage 0."""
    return 0.0


def rare_hash_reward(response: str, example: object) -> float:
    """1 for a quarter of all distinct texts (two CRC bits): a group of 4 responses is all 0 about a
    third of the time, so a step has both informative and all-equal groups."""
    import zlib

    return float(zlib.crc32(response.encode()) & 3 == 0)


def failing_half_reward(response: str, example: object) -> float:
    """Raises for half of all distinct texts (the other half scores 1): counted as reward errors."""
    import zlib

    if zlib.crc32(response.encode()) & 1:
        raise RuntimeError("this reward fails on purpose")
    return 1.0
