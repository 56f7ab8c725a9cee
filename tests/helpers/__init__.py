"""What the tests share: the subprocess runner, data splits, the fake-CUDA checker."""
