"""Render `nbs/index.ipynb` to `README.md` (what `nbdev_readme` does, without needing Quarto on the machine).

Markdown cells are copied; code cells are shown as ```python blocks followed by their text outputs, except cells
whose first lines carry `#| hide` (or `#| include: false`); `#| echo: false` shows the outputs only. nbdev directives
(`#| ...`) are dropped. The figures README shows are copied from the committed outputs of the notebook cells that say
so in a comment (`# README figure: nbs/images/NAME.png`), so no notebook or test writes tracked files.
`--check` exits 1 when README.md or one of those figures differs from what the notebooks render to.
"""
import base64, json, re, sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent

def _directives(src):
    return [l.strip() for l in src.splitlines() if l.strip().startswith('#|')]

def _text_outputs(cell):
    out = []
    for o in cell.get('outputs', []):
        if o.get('output_type') == 'stream' and o.get('name') == 'stdout': out.append(''.join(o['text']))
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
        if code and not any(d.replace(' ', '') == '#|echo:false' for d in ds): parts.append(f'```python\n{code}\n```')
        txt = _text_outputs(cell)
        if txt: parts.append(f'```\n{txt}\n```')
    return '<!-- generated from nbs/index.ipynb by tools/readme.py; edit the notebook -->\n\n' + '\n\n'.join(parts) + '\n'

FIGURE = re.compile(r'^\s*#\s*README figure:\s*(nbs/images/[\w.-]+\.png)\s*$', re.M)

def figures()->dict:
    "README's figures (path -> PNG bytes) from the committed outputs of the cells that name them."
    out = {}
    for nb_path in sorted((root/'nbs').glob('[!_]*.ipynb')):
        for cell in json.loads(nb_path.read_text())['cells']:
            names = FIGURE.findall(''.join(cell['source'])) if cell['cell_type'] == 'code' else []
            pngs = [o['data']['image/png'] for o in cell.get('outputs', []) if 'image/png' in o.get('data', {})]
            for name in names:
                if not pngs: sys.exit(f'{nb_path.name}: the cell naming {name} has no figure output; run `python tools/notebooks.py run {nb_path}`')
                out[name] = base64.b64decode(''.join(pngs[0]))
    return out

if __name__ == '__main__':
    text, readme, figs = render(), root/'README.md', figures()
    if '--check' in sys.argv:
        if not readme.exists() or readme.read_text() != text:
            sys.exit('README.md is out of date with nbs/index.ipynb: run `python tools/readme.py`')
        stale = [n for n, png in figs.items() if not (root/n).exists() or (root/n).read_bytes() != png]
        if stale: sys.exit(f'{stale} differ from the notebook outputs they come from: run `python tools/readme.py`')
    else:
        readme.write_text(text)
        for n, png in figs.items(): (root/n).write_bytes(png)
