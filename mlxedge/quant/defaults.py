"""The quantize command's choices and defaults, in a module that imports nothing, so that the CLI
can declare its options without loading numpy (`mlxedge --help` stays instant)."""

METHODS = ("rtn", "mse", "mse-zero")
# Chosen from bench/RESULTS.md's choice-text columns where SmolLM2's own 4-bit grid flatters no
# method (2 and 3 bits): keeping zero on the grid lowered mean KL against MLX's rule by 13 %
# (groups of 64) and 17 % (groups of 32) at 3 bits, where a free squared-error fit raised it by
# 34 % (groups of 64). See README "Defaults".
DEFAULT_METHOD = "mse-zero"

RECIPES = ("uniform", "mixed")
# Chosen from the same columns: on SmolLM2 the mixed recipe at 3 bits (4.13 bits per weight) has
# mean KL 0.95 where uniform 3-bit groups of 32 (4.00) have 1.38 (both mse-zero): a few more bits
# in the layers that matter beat more bits everywhere. See README "Defaults".
DEFAULT_RECIPE = "mixed"
