"""Link-time probe: which of the module's weak references does libnibble define?

The module declares the library entry points that may not have landed yet as weak (src/weak_ops.h).
A weak reference does not pull an object out of a static archive, so this script — run just
before the link — lists the weak undefined symbols of the module's objects, keeps those libnibble
defines, and writes them as `-Wl,-u,<symbol>` lines to a response file the link reads. Defined
entry points are then linked in (with exactly the objects they need); missing ones stay null and
raise NotImplementedError when called.
Usage: link_probe.py OUT.rsp LIBNIBBLE.a OBJECT_DIR
"""
import pathlib
import subprocess
import sys


def symbols(args):
    out = subprocess.run(["nm", "-g", "--format=posix", *args], capture_output=True, text=True,
                         check=True).stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and not parts[0].endswith(":") and not line.endswith(":"):
            yield parts[0], parts[1]


def main():
    out, archive, objdir = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])
    lines = []
    try:
        objects = [str(p) for p in objdir.rglob("*.o")]
        weak = {name for name, kind in symbols(objects) if kind in ("w", "v")}
        defined = {name for name, kind in symbols([archive]) if kind in ("T", "W")}
        for name in sorted(weak & defined):
            if name.startswith("_ZN6nibble") or name.startswith("_ZNK6nibble"):
                lines.append(f"-Wl,-u,{name}")
        missing = sorted(n for n in weak - defined if n.startswith("_ZN6nibble"))
        if missing:
            print(f"link_probe: {len(missing)} nibble entry point(s) not in libnibble yet "
                  "(they raise NotImplementedError)", file=sys.stderr)
    except (OSError, subprocess.CalledProcessError) as e:  # no nm: every weak entry point stays null
        print(f"link_probe: {e}; weak entry points left unresolved", file=sys.stderr)
    text = "\n".join(lines) + "\n"
    path = pathlib.Path(out)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


if __name__ == "__main__":
    main()
