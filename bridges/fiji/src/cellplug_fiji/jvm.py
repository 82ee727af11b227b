"""Finding ImageJ 1.x and Java, and starting the JVM in this process (JPype).

The JVM is started with the system's Java (JPype finds it from JAVA_HOME or the ``java`` on
PATH); nothing is downloaded. ``jpype.config.destroy_jvm = False`` is set first: shutting the
JVM down at exit waits for ImageJ's non-daemon AWT threads, so Python would never exit.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from cellplug.errors import CellplugError

# where Debian's libij-java (ImageJ 1.53t) puts it, then other usual places
IJ_JAR_CANDIDATES = ("/usr/share/java/ij.jar", "/usr/local/share/java/ij.jar",
                     "/opt/ImageJ/ij.jar", "/Applications/ImageJ.app/Contents/Java/ij.jar")


def find_ij_jar(given: str | os.PathLike[str] | None = None) -> Path:
    """``given``, else ``$CELLPLUG_IJ_JAR``, else the first of :data:`IJ_JAR_CANDIDATES`."""
    for candidate, what in ((given, "--ij-jar"), (os.environ.get("CELLPLUG_IJ_JAR"),
                                                  "CELLPLUG_IJ_JAR")):
        if candidate:
            path = Path(candidate).expanduser()
            if path.is_dir():  # an ImageJ folder
                path = path / "ij.jar"
            if not path.is_file():
                raise CellplugError(f"{what}: {path} is not an ImageJ jar")
            return path
    for candidate in IJ_JAR_CANDIDATES:
        if Path(candidate).is_file():
            return Path(candidate)
    raise CellplugError("no ImageJ 1.x jar found (looked in " + ", ".join(IJ_JAR_CANDIDATES)
                        + "); install one (Debian: apt install libij-java), give --ij-jar "
                        "PATH or CELLPLUG_IJ_JAR, or use a Fiji with --fiji-dir")


def imagej_home(jar: Path) -> Path:
    """The folder whose ``plugins/`` ImageJ 1.x should load: the jar's own when it has one (an
    ImageJ installation), else ``~/.cellplug/imagej`` (made, with an empty ``plugins/``).

    Without a usable one, ImageJ takes ``plugins/`` of the working directory, whatever that
    holds (in cellplug's repository: its Python plugin packages, shown as menus).
    """
    if (jar.parent / "plugins").is_dir():
        return jar.parent
    home = Path.home() / ".cellplug" / "imagej"
    (home / "plugins").mkdir(parents=True, exist_ok=True)
    return home


def java_home() -> str | None:
    """JAVA_HOME, else the JDK/JRE of the ``java`` on PATH (what JPype should load)."""
    if os.environ.get("JAVA_HOME"):
        return os.environ["JAVA_HOME"]
    java = shutil.which("java")
    if java is None:
        return None
    return str(Path(java).resolve().parents[1])


def check_display() -> None:
    """ImageJ's menus and windows need an X display (or a desktop session)."""
    if os.name == "posix" and not os.environ.get("DISPLAY") and not _is_macos():
        raise CellplugError("ImageJ's windows need a display and DISPLAY is not set; on a "
                            "server without a screen run it under Xvfb (xvfb-run -a cellplug "
                            "fiji start)")


def _is_macos() -> bool:
    import sys

    return sys.platform == "darwin"


def start_jvm(classpath: list[Path], options: list[str] | None = None) -> None:
    """Start the JVM once per process with ``classpath`` (a no-op when it already runs)."""
    import jpype
    import jpype.config

    jpype.config.destroy_jvm = False  # else exit waits for ImageJ's AWT threads: a hang
    if jpype.isJVMStarted():
        return
    home = java_home()
    try:
        jvm = jpype.getDefaultJVMPath()
    except jpype.JVMNotFoundException:
        jvm = None
    if jvm is None:
        raise CellplugError(f"no Java runtime found (JAVA_HOME={home or 'unset'}); install "
                            f"Java 11 or newer (Debian: apt install default-jdk-headless)")
    # interrupt=False: Ctrl-C goes to Python (a KeyboardInterrupt), not to the JVM's own
    # handler, which would shut the JVM down under Python's feet
    jpype.startJVM(jvm, *(options or []), classpath=[str(p) for p in classpath],
                   convertStrings=False, interrupt=False)
    stop_reference_queue_at_exit()


def stop_reference_queue_at_exit() -> None:
    """At exit, stop JPype's reference-queue thread before Python finalises.

    With ``destroy_jvm = False`` that Java thread keeps running; when it asks for the GIL while
    Python finalises, CPython ends it with ``pthread_exit``, whose unwinding through the JVM's
    frames aborts the process ("FATAL: exception not rethrown", exit code 134), seen here in
    about one exit out of three. Registered after JPype's own exit hook, so it runs first.
    """
    import atexit

    def stop() -> None:
        import jpype

        if jpype.isJVMStarted():
            try:
                jpype.JClass("org.jpype.ref.JPypeReferenceQueue").getInstance().stop()
            except Exception:  # noqa: BLE001 - at exit; nothing better to do
                pass

    atexit.register(stop)
