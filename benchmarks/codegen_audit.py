"""What the compiler makes of each Triton kernel for a Hopper GPU, on any machine (no GPU needed).

python benchmarks/codegen_audit.py [sm] [dtype ...]: runs every kernel launcher of
fixedpoint.kernels.triton_kernels at FPDM-XL/2 size (batch 32, 256 x 1152 features) with
its default launch parameters, compiles each launch for sm_90 (Triton's bundled ptxas)
with the specialisations a real launch would get (16-byte aligned pointers, integers
divisible by 16, integers equal to 1), and prints per kernel and dtype: the global loads
and stores by width (a 16-byte vector moves 8 bf16 or 4 fp32 values per instruction),
cp.async copies (pipelined loads), registers per thread, shared memory and the warps one
SM can hold. Narrow accesses on the (B, D) streams and few resident warps are what keeps
a streaming kernel under the memory bandwidth; these are compiler facts, not timings.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, replace

os.environ.pop("TRITON_INTERPRET", None)  # the compiler, not the interpreter

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from fixedpoint.kernels import triton_kernels as tk  # noqa: E402
from fixedpoint.kernels.groups import (  # noqa: E402
    BroydenApplies,
    BroydenStep,
    Pair,
)
from fixedpoint.testing import anderson_state, broyden_state, loop_buffers  # noqa: E402

BATCH, TOKENS, WIDTH, M, N = 32, 256, 1152, 5, 10
REGISTERS_PER_SM, MAX_WARPS_PER_SM, SHARED_PER_SM = 65536, 64, 227 * 1024  # sm_90
TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int8: "i8", torch.uint8: "u8",
         torch.int64: "i64", torch.int32: "i32", torch.bool: "i1"}  # fmt: skip
ACCESS = re.compile(r"\b(ld|st)\.global(?:\.\w+)*?\.(?:v(\d)\.)?[bfsu](\d+)\b")
ASYNC = re.compile(r"\bcp\.async\.(?:ca|cg)\.shared\.global(?:\.\w+)*\s*\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-f]+|\d+)")


@dataclass
class Launch:
    """One captured kernel launch: the JIT function, its positional arguments and keyword arguments."""

    fn: JITFunction
    args: tuple
    kwargs: dict


@dataclass
class Codegen:
    """What one launch compiles to."""

    kernel: str
    loads: Counter  # bytes per instruction -> instructions in the PTX
    stores: Counter
    async_copies: Counter
    registers: int
    shared: int
    warps: int

    @property
    def resident_warps(self) -> int:
        """Warps one SM holds, limited by registers, shared memory and the hardware maximum."""
        threads = 32 * self.warps
        by_regs = REGISTERS_PER_SM // max(self.registers * threads, 1)
        by_shared = SHARED_PER_SM // self.shared if self.shared else by_regs
        return min(by_regs, by_shared, MAX_WARPS_PER_SM // self.warps) * self.warps


def capture(thunk) -> list[Launch]:
    """The Triton launches ``thunk`` makes, recorded instead of run."""
    launches: list[Launch] = []
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs))

    JITFunction.run = record
    try:
        thunk()
    finally:
        JITFunction.run = original
    return launches


def compile_launch(launch: Launch, arch: int = 90):
    """Compile a captured launch for ``sm_{arch}`` with a real launch's specialisations."""
    params = launch.fn.params
    names = [p.name for p in params]
    bound = dict(zip(names, launch.args))
    bound.update({k: v for k, v in launch.kwargs.items() if k in names})
    signature, constexprs, aligned = {}, {}, []
    for i, p in enumerate(params):
        value = bound[p.name]
        if p.is_constexpr or (isinstance(value, int) and not isinstance(value, bool) and value == 1):
            signature[p.name], constexprs[p.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[p.name] = "*" + TYPES[value.dtype]
            if value.data_ptr() % 16 == 0:
                aligned.append(i)
        elif isinstance(value, bool):
            signature[p.name] = "i1"
        elif isinstance(value, int):
            signature[p.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                aligned.append(i)
        else:
            signature[p.name] = "fp32"
    options = {k: v for k, v in launch.kwargs.items() if k in ("num_warps", "num_stages", "enable_fp_fusion")}
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    source = ASTSource(fn=launch.fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options), options.get("num_warps", 4)


def _registers(cubin: bytes) -> int:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True)
    return int(re.search(r"REG:(\d+)", usage.stdout).group(1))


def codegen(launch: Launch, arch: int = 90) -> Codegen:
    """Global access widths, registers and shared memory of one launch's compiled kernel."""
    kernel, warps = compile_launch(launch, arch)
    ptx = kernel.asm["ptx"]
    loads, stores = Counter(), Counter()
    for op, lanes, bits in ACCESS.findall(ptx):
        (loads if op == "ld" else stores)[int(lanes or 1) * int(bits) // 8] += 1
    copies = Counter(int(n, 0) for n in ASYNC.findall(ptx))  # bytes, decimal or hex
    return Codegen(launch.fn.__name__, loads, stores, copies, _registers(kernel.asm["cubin"]),
                   kernel.metadata.shared, warps)  # fmt: skip


def kernel_cases(dtype: torch.dtype, dim: int = TOKENS * WIDTH) -> dict[str, callable]:
    """Each launcher at (BATCH, dim), its defaults, on CPU tensors (never run: only captured)."""

    def new(*shape, dt=dtype):
        return torch.empty(*shape, dtype=dt)

    x, fx, g, dx, hg, v = (new(BATCH, dim) for _ in range(6))
    F, G, U, V = new(BATCH, M, dim), new(BATCH, M, dim), new(BATCH, N, dim), new(BATCH, N, dim)
    vec = torch.zeros(BATCH)
    active = torch.ones(BATCH, dtype=torch.bool)
    alive, restarts = torch.ones(BATCH, N, dtype=torch.int8), torch.zeros(BATCH, dtype=torch.int64)
    # the groups (fields these launchers do not read: small zeros); count 2: the history write goes to slot 2
    anderson = anderson_state(F, G, slot=2, alpha=torch.zeros(BATCH, M))
    loop = loop_buffers(best_x=x, best_fx=fx)
    # dots, combine: N slots, the state's hg = hg; finish: slot 0, the state's x, g, hg = fx, dx, dx, the step's dx = hg
    broyden = broyden_state(U, V, N, alive, restarts=restarts, x=fx, g=dx, gnorm=vec, hg=hg, next_x=x)
    step = BroydenStep(x=x, g=g, gnorm=vec, dx=dx)
    finish = (
        replace(broyden, hg=dx, count=0),
        BroydenStep(x=x, g=g, gnorm=vec, dx=hg),
        BroydenApplies(h_g=v, v=g, sums=torch.zeros(BATCH, 4)),
    )
    return {
        "residual": lambda: tk.residual(x, fx, None),
        "residual (writes g)": lambda: tk.residual(x, fx, g),
        "picard_step (damped)": lambda: tk.picard_step(x, fx, 0.5, x, active),
        f"anderson_residual_write m={M}": lambda: tk.anderson_residual_write(anderson, x, fx),
        f"anderson_mix m={M}": lambda: tk.anderson_mix(anderson, 1.0, x, active),
        "best_update": lambda: tk.best_update(loop, Pair(x, fx), Pair(g, dx), torch.zeros(BATCH, dtype=torch.int8)),
        f"broyden_dots n={N}": lambda: tk.broyden_dots(broyden, step),
        f"broyden_combine n={N}": lambda: tk.broyden_combine(broyden, step, torch.zeros(BATCH, 2, N)),
        "broyden_finish": lambda: tk.broyden_finish(*finish, growth=100.0),
    }


def _widths(counts: Counter) -> str:
    return " ".join(f"{n}x{size}B" for size, n in sorted(counts.items(), reverse=True)) or "-"


def audit(
    dtypes: list[torch.dtype], arch: int = 90, cases: list[str] | None = None, dim: int = TOKENS * WIDTH
) -> list[dict]:
    """One row per kernel case (all, or those whose names start with one of ``cases``) and dtype, at (BATCH, dim)."""
    rows = []
    for dtype in dtypes:
        for name, thunk in kernel_cases(dtype, dim).items():
            if cases is not None and not name.startswith(tuple(cases)):
                continue
            for launch in capture(thunk):
                c = codegen(launch, arch)
                rows.append({"case": name, "dtype": TYPES[dtype], "loads": _widths(c.loads),
                             "async copies": _widths(c.async_copies), "stores": _widths(c.stores),
                             "registers": c.registers, "shared": c.shared, "warps": c.warps,
                             "resident warps/SM": c.resident_warps, "codegen": c})  # fmt: skip
    return rows


def main(argv: list[str]) -> None:
    arch = int(argv[0]) if argv and argv[0].isdigit() else 90
    names = [a for a in argv if not a.isdigit()] or ["float32", "bfloat16"]
    print(f"sm_{arch}, batch {BATCH} x {TOKENS * WIDTH} features, default launch parameters; "
          "accesses are PTX instructions by bytes each")  # fmt: skip
    header = ("case", "dtype", "loads", "async copies", "stores", "registers", "resident warps/SM")
    print(" | ".join(header))
    for row in audit([getattr(torch, n) for n in names], arch):
        print(" | ".join(str(row[k]) for k in header), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
