"""Run our Metal kernels on the CPU, from the very text MLX generates for a Mac.

For each instantiation, `mlxedge.quant.metal.generated_source` gives MLX's kernel text (signature,
template arguments and attributes included). The harness:

1. checks the kernel's own text stays inside the Metal Shading Language (`metal_violations`: no
   C++ standard library, no allocation, exceptions, recursion, double, ...);
2. compiles every instantiation in one C++ translation unit with `metal_prelude.h` (what MLX's
   utils.h and the Metal standard library provide, the subset our kernels use), each inside its
   own namespace, with a generated driver that walks the whole grid threadgroup by threadgroup —
   partial threadgroups at the edges included — and passes each thread its attributes;
   the library is cached by a hash of the text and flags;
3. runs it on numpy buffers, with outputs poisoned (0xCD bytes) beforehand so an element no
   thread wrote shows.

The threads of each threadgroup run as fibers on a fixed schedule (metal_prelude.h), so
threadgroup memory and barriers behave deterministically and a missing barrier shows; SIMD-group
operations are refused by name until a kernel needs them.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlxedge.quant.metal import KernelSpec, Launch, generated_source, header

PRELUDE = Path(__file__).with_name("metal_prelude.h")
FLAGS = ["-O2", "-ffp-contract=off", "-fno-fast-math", "-fexcess-precision=16",
         "-Wno-attributes", "-std=c++17", "-shared", "-fPIC"]  # fmt: skip
POISON = 0xCD
CACHE = Path(os.environ.get("MLXEDGE_METAL_CACHE", Path(tempfile.gettempdir()) / "mlxedge-metal"))

# Constructs the Metal Shading Language does not have (or our kernels must not use): checked on
# the kernel's own text (body and header), not on the prelude.
METAL_CHECKS = {
    "the C++ standard library": r"\bstd::|#\s*include",
    "dynamic allocation": r"\bnew\b|\bdelete\b|\bmalloc\s*\(|\bcalloc\s*\(|\bfree\s*\(",
    "exceptions": r"\btry\b|\bcatch\b|\bthrow\b",
    "goto": r"\bgoto\b",
    "double precision": r"\bdouble\b",
    "I/O": r"\bprintf\s*\(|\bputs\s*\(|\bfopen\s*\(",
    "virtual functions": r"\bvirtual\b",
    "static or thread_local storage": r"\bstatic\b|\bthread_local\b",
    "function pointers": r"\(\s*\*\s*\w+\s*\)\s*\(",
    "variable-length arrays or alloca": r"\balloca\s*\(",
}
# SIMD-group operations: no kernel needs them yet (threadgroup memory and barriers run on the
# prelude's fibers)
UNSUPPORTED = r"\bsimd_\w+|\bquad_\w+|\bsimdgroup_barrier"


def _code(text: str) -> str:
    """`text` without its comments, which may say anything."""
    return re.sub(r"//[^\n]*|/\*.*?\*/", "", text, flags=re.S)


def metal_violations(text: str) -> list[str]:
    """What in `text` (a kernel body and header) the Metal Shading Language lacks, by name."""
    code = _code(text)
    found = [name for name, pattern in METAL_CHECKS.items() if re.search(pattern, code)]
    for m in re.finditer(r"\b(\w+)\s*\([^;{)]*\)\s*\{", code):  # functions the text defines
        fn = m.group(1)
        if fn in ("if", "for", "while", "switch"):
            continue
        if re.search(rf"\b{fn}\s*\(", _body(code, m.end() - 1)):
            found.append(f"recursion ({fn})")
    return found


def _body(code: str, brace: int) -> str:
    """The text between the brace at `brace` and the one that closes it."""
    depth = 0
    for i in range(brace, len(code)):
        depth += {"{": 1, "}": -1}.get(code[i], 0)
        if depth == 0:
            return code[brace + 1 : i]
    return code[brace + 1 :]


@dataclass
class Param:
    ctype: str  # with address spaces removed
    name: str
    attribute: str  # "buffer" or a thread attribute
    index: int | None


@dataclass
class Instance:
    spec: KernelSpec
    launch: Launch
    text: str
    function: str
    template_args: str
    params: list[Param]


_ATTRIBUTES = {
    "thread_position_in_grid": "tpig",
    "threads_per_grid": "G",
    "grid_size": "G",
    "grid_origin": "uint3{0, 0, 0}",
    "thread_position_in_threadgroup": "tpitg",
    "threadgroup_position_in_grid": "uint3{gx, gy, gz}",
    "threadgroups_per_grid": "NG",
    "threads_per_threadgroup": "cur",
    "dispatch_threads_per_threadgroup": "TG",
    "thread_index_in_threadgroup": "tiitg",
}


def _parse(spec: KernelSpec, launch: Launch, text: str) -> Instance:
    found = re.search(r"\[\[kernel\]\] void (\w+)\((.*?)\) \{", text, re.S)
    if found is None:
        raise ValueError(f"{spec.name}: no kernel signature in the generated text")
    function, signature = found.groups()
    targs = re.search(rf"decltype\({function}(<.*?>)?\)", text)
    params = []
    for line in signature.split(",\n"):
        m = re.fullmatch(r"\s*(.*?)\s*(\w+)\s*\[\[(\w+)(?:\((\d+)\))?\]\]\s*", line)
        if m is None:
            raise ValueError(f"{spec.name}: cannot read the parameter {line.strip()!r}")
        ctype, name, attribute, index = m.groups()
        ctype = re.sub(r"\b(device|constant|thread)\b\s*", "", ctype).strip()
        params.append(Param(ctype, name, attribute, None if index is None else int(index)))
    return Instance(spec, launch, text, function, (targs.group(1) or "") if targs else "", params)


def _driver(i: int, inst: Instance) -> str:
    args = []
    for p in inst.params:
        if p.attribute == "buffer":
            if p.ctype.endswith("&"):
                base = p.ctype[:-1].strip()
                args.append(f"*reinterpret_cast<{base}*>(buf[{p.index}])")
            else:
                args.append(f"reinterpret_cast<{p.ctype}>(buf[{p.index}])")
        elif p.attribute in _ATTRIBUTES:
            args.append(_ATTRIBUTES[p.attribute])
        else:
            raise ValueError(f"{inst.spec.name}: the harness has no value for {p.attribute}")
    call = f"{inst.function}{inst.template_args}({', '.join(args)});"
    return f"""
extern "C" int run_{i}(void** buf, const uint32_t* grid, const uint32_t* group) {{
    const uint3 G{{grid[0], grid[1], grid[2]}}, TG{{group[0], group[1], group[2]}};
    const uint3 NG{{(G.x + TG.x - 1) / TG.x, (G.y + TG.y - 1) / TG.y, (G.z + TG.z - 1) / TG.z}};
    for (uint32_t gz = 0; gz < NG.z; gz++)
    for (uint32_t gy = 0; gy < NG.y; gy++)
    for (uint32_t gx = 0; gx < NG.x; gx++) {{
        // an edge threadgroup is partial: only the threads inside the grid exist
        const uint3 cur{{metal::min(TG.x, G.x - gx * TG.x), metal::min(TG.y, G.y - gy * TG.y),
                         metal::min(TG.z, G.z - gz * TG.z)}};
        const bool ok = emu::run_threadgroup(cur.x * cur.y * cur.z, [&](int t) {{
            const uint tiitg = uint(t);
            const uint lx = tiitg % cur.x, ly = tiitg / cur.x % cur.y, lz = tiitg / (cur.x * cur.y);
            const uint3 tpitg{{lx, ly, lz}};
            const uint3 tpig{{gx * TG.x + lx, gy * TG.y + ly, gz * TG.z + lz}};
            (void)tpitg; (void)tpig;
            {call}
        }});
        if (!ok) {{
            return 1;  // a barrier some threads never reached
        }}
    }}
    return 0;
}}
"""


class Harness:
    """Every instantiation of `instances` ((spec, launch) pairs) compiled into one library."""

    def __init__(self, instances: list[tuple[KernelSpec, Launch]],
                 text_of=generated_source) -> None:  # fmt: skip
        self.instances: list[Instance] = []
        for spec, launch in instances:
            violations = metal_violations(header() + spec.source)
            if violations:
                raise ValueError(f"{spec.name} uses what Metal lacks: {', '.join(violations)}")
            used = sorted(set(re.findall(UNSUPPORTED, _code(spec.source))))
            if used:
                raise NotImplementedError(f"{spec.name} uses {', '.join(used)}: the harness "
                                          "has no deterministic schedule for it yet")  # fmt: skip
            self.instances.append(_parse(spec, launch, text_of(spec, launch)))
        unit = [f'#include "{PRELUDE}"']
        for i, inst in enumerate(self.instances):
            unit += [f"namespace k{i} {{", inst.text, _driver(i, inst), "}"]
        self.source = "\n".join(unit)
        self._lib = ctypes.CDLL(str(_compile(self.source)))

    def run(self, i: int, inputs: list[np.ndarray], launch: Launch | None = None):
        """Instance `i` over the whole grid of `launch` (default: the one it was built for) on
        `inputs` (numpy, in the kernel's order); returns the outputs, which start as poison."""
        inst = self.instances[i]
        launch = launch or inst.launch
        if launch.template != inst.launch.template:
            raise ValueError("a launch of another instantiation")
        shapes = zip(launch.output_shapes, launch.output_dtypes, strict=True)
        outputs = [_poisoned(shape, dt) for shape, dt in shapes]
        arrays = [np.ascontiguousarray(a) for a in inputs] + outputs
        buffers = (ctypes.c_void_p * len(arrays))(*[a.ctypes.data for a in arrays])
        grid = (ctypes.c_uint32 * 3)(*launch.grid)
        # MLX clamps the threadgroup to the grid per dimension
        clamped = (min(t, g) for t, g in zip(launch.threadgroup, launch.grid, strict=True))
        group = (ctypes.c_uint32 * 3)(*clamped)
        if getattr(self._lib, f"run_{i}")(buffers, grid, group) != 0:
            raise RuntimeError(f"{inst.spec.name}: threads ended while others waited at a barrier")
        return outputs


def _np_dtype(mx_dtype) -> np.dtype:
    import ml_dtypes

    name = str(mx_dtype).rsplit(".", 1)[-1]
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def _poisoned(shape, mx_dtype) -> np.ndarray:
    dtype = _np_dtype(mx_dtype)
    raw = np.full(int(np.prod(shape)) * dtype.itemsize, POISON, np.uint8)
    return raw.view(dtype).reshape(shape)


def _compile(source: str) -> Path:
    key = hashlib.sha256((source + PRELUDE.read_text() + " ".join(FLAGS)).encode()).hexdigest()
    lib = CACHE / f"{key[:24]}.so"
    if lib.exists():
        return lib
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        src = Path(tmp) / "unit.cpp"
        src.write_text(source)
        out = Path(tmp) / "unit.so"
        done = subprocess.run(["g++", *FLAGS, str(src), "-o", str(out)],
                              capture_output=True, text=True)  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"the kernels did not compile as C++:\n{done.stderr[-4000:]}")
        os.replace(out, lib)  # atomic: parallel workers may compile the same unit
    return lib
