import subprocess
import sys
from pathlib import Path

import r1v.model


def test_every_export_resolves() -> None:
    for name in r1v.model.__all__:
        assert getattr(r1v.model, name) is not None, name


def test_light_modules_do_not_import_torch() -> None:
    code = "import sys, r1v.model.tokens, r1v.model.tiling, r1v.data.prompt; print('torch' in sys.modules)"
    root = Path(r1v.model.__file__).parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "False"
