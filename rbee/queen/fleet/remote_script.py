"""The small program the queen runs on a host with the host's own Python (``python3 - CMD ARGS``,
the program on stdin), before rbee is installed there. Standard library only; prints JSON."""

SCRIPT = r'''
import json, os, platform, signal, subprocess, sys, time, urllib.request

def read_json(path):
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None

def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

def command_line(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        try:
            return subprocess.run(["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True,
                                  timeout=5).stdout
        except Exception:
            return ""

def started_at(pid):
    """The process's start, wall clock (Linux); None where /proc does not say."""
    try:
        with open("/proc/%d/stat" % pid) as handle:
            ticks = int(handle.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as handle:
            boot = next(int(line.split()[1]) for line in handle if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None

def health_role(url):
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as response:
            return json.load(response).get("role")
    except Exception:
        return None

def is_our_hive(hive, name):
    """Is hive.json's pid still the hive it recorded? A pid is reused after a reboot or a crash:
    the process must run rbee.hive, have started before the record was written, and, if it
    answers, say it is hive:NAME."""
    pid = hive.get("pid")
    if not isinstance(pid, int) or not alive(pid):
        return False
    if "rbee.hive" not in command_line(pid):
        return False
    start, recorded = started_at(pid), hive.get("started")
    if start is not None and isinstance(recorded, (int, float)) and start > recorded + 2:
        return False
    role = health_role(str(hive.get("url", "")))
    return role is None or role == "hive:" + str(hive.get("name", name))

def hive_state(home, name=""):
    hive = read_json(os.path.join(home, "run", "hive.json"))
    if hive and isinstance(hive.get("pid"), int):
        hive["alive"] = is_our_hive(hive, name)
    return hive

def cpu_text():
    """The first processor of /proc/cpuinfo (Linux) or sysctl's CPU lines (macOS), for rbee.engine.cpu."""
    if platform.system() == "Darwin":
        try:
            return subprocess.run(["sysctl", "hw.optional", "machdep.cpu.brand_string"], capture_output=True,
                                  text=True, timeout=5).stdout
        except Exception:
            return ""
    try:
        with open("/proc/cpuinfo", errors="replace") as handle:
            return handle.read().split("\n\n", 1)[0]
    except OSError:
        return ""

def probe(home):
    home = os.path.abspath(os.path.expanduser(home))
    return {
        "system": platform.system().lower(),
        "machine": platform.machine().lower(),
        "python": "%d.%d" % sys.version_info[:2],
        "python_full": platform.python_version(),
        "home": home,
        "installed": read_json(os.path.join(home, "install.json")),
        "venv": os.path.isfile(os.path.join(home, "venv", "bin", "python")),
        "hive": hive_state(home),
        "nvidia": os.path.exists("/proc/driver/nvidia/version"),
        "cpu": cpu_text(),
        "engine": read_json(os.path.join(home, "venv", "rbee-engine.json")),
        "nvcc": any(os.access(os.path.join(d, "nvcc"), os.X_OK)
                    for d in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/local/cuda/bin"]),
    }

def verify(folder, wanted):
    """sha256 of each file the queen names; any other package file in the folder is removed, so
    pip's --find-links sees exactly what the queen pushed."""
    import hashlib
    names = set(json.loads(wanted))
    try:
        present = os.listdir(folder)
    except OSError:
        return {}
    found = {}
    for name in present:
        path = os.path.join(folder, name)
        if not name.endswith((".whl", ".tar.gz")) or not os.path.isfile(path) or os.path.islink(path):
            continue
        if name not in names:
            os.unlink(path)
            continue
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        found[name] = digest.hexdigest()
    return found

def stop(home, grace):
    hive = hive_state(home)
    result = {"was_running": False}
    if hive and hive.get("alive"):
        result["was_running"] = True
        pid = hive["pid"]
        os.kill(pid, signal.SIGTERM)
        deadline = time.time() + grace
        while alive(pid) and time.time() < deadline:
            time.sleep(0.05)
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
            result["killed"] = True
    try:
        os.remove(os.path.join(home, "run", "hive.json"))
    except OSError:
        pass
    return result

def tail(home, lines):
    try:
        with open(os.path.join(home, "logs", "hive.log"), errors="replace") as handle:
            return {"lines": handle.read().splitlines()[-lines:]}
    except OSError as exc:
        return {"lines": [], "error": str(exc)}

command, args = sys.argv[1], sys.argv[2:]
if command == "probe":
    out = probe(args[0])
elif command == "verify":
    out = verify(args[0], args[1])
elif command == "stop":
    out = stop(args[0], float(args[1]))
elif command == "tail":
    out = tail(args[0], int(args[1]))
else:
    raise SystemExit("unknown command " + command)
print(json.dumps(out))
'''
