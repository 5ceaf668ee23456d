"""Render `nbs/index.ipynb` to `README.md` (what `nbdev_readme` does, without needing Quarto on the machine).

Markdown cells are copied; code cells are shown as ```python blocks followed by their text outputs, except cells
whose first lines carry `#| hide` (or `#| include: false`). nbdev directives (`#| ...`) are dropped.
`--check` exits 1 when README.md differs from what the notebook renders to.
"""
import json, sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent

def _directives(src):
    return [l.strip() for l in src.splitlines() if l.strip().startswith('#|')]

def _text_outputs(cell):
    out = []
    for o in cell.get('outputs', []):
        if o.get('output_type') == 'stream': out.append(''.join(o['text']))
        elif 'data' in o and 'text/plain' in o['data'] and 'text/html' not in o['data'] and 'image/png' not in o['data']:
            out.append(''.join(o['data']['text/plain']) + '\n')
    return ''.join(out).rstrip('\n')

def render(nb_path=root/'nbs'/'index.ipynb'):
    nb = json.loads(Path(nb_path).read_text())
    parts = []
    for cell in nb['cells']:
        src = ''.join(cell['source'])
        if cell['cell_type'] == 'markdown': parts.append(src.strip()); continue
        if cell['cell_type'] != 'code': continue
        ds = _directives(src)
        if any(d.replace(' ', '') in ('#|hide', '#|include:false') for d in ds): continue
        code = '\n'.join(l for l in src.splitlines() if not l.strip().startswith('#|')).strip()
        if code: parts.append(f'```python\n{code}\n```')
        txt = _text_outputs(cell)
        if txt: parts.append(f'```\n{txt}\n```')
    return '<!-- generated from nbs/index.ipynb by tools/readme.py; edit the notebook -->\n\n' + '\n\n'.join(parts) + '\n'

if __name__ == '__main__':
    text, readme = render(), root/'README.md'
    if '--check' in sys.argv:
        if not readme.exists() or readme.read_text() != text:
            sys.exit('README.md is out of date with nbs/index.ipynb: run `python tools/readme.py`')
    else: readme.write_text(text)
