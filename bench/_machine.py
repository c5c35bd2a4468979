"""What the benchmarks print about the machine they ran on."""
import platform


def cpu_name() -> str:
    "The CPU's model name (from /proc/cpuinfo on Linux)."
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    "The 1-, 5- and 15-minute load averages and the core count: how shared the machine was."
    import os

    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "load average unknown"
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} (1, 5, 15 min) on {os.cpu_count()} cores"
