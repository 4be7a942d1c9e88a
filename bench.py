"""
Benchmarks, one file, one subcommand each:

    python bench.py ring      # ring attention vs single-process attention (context_parallel.py)
    python bench.py profile   # measure the cost model's constants on this device -> JSON
    python bench.py e2e       # end-to-end tokens/s of naive vs sorted vs skrull (train.py)
"""
import sys

# -----------------------------------------------------------------------------
# ring


def bench_ring(argv):
    raise NotImplementedError("bench.py ring")

# -----------------------------------------------------------------------------
# profile


def bench_profile(argv):
    raise NotImplementedError("bench.py profile")

# -----------------------------------------------------------------------------
# e2e


def bench_e2e(argv):
    raise NotImplementedError("bench.py e2e")

# -----------------------------------------------------------------------------

if __name__ == "__main__":
    commands = {"ring": bench_ring, "profile": bench_profile, "e2e": bench_e2e}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        sys.exit(f"usage: python bench.py {{{','.join(commands)}}} [options]")
    commands[sys.argv[1]](sys.argv[2:])
