"""Look and behaviour of the page: theme, CSS, and the small script that adds tooltips and Ctrl+Enter.

Nothing here may make the browser fetch from the network: system fonts only, no CDN, no web fonts.
"""
from __future__ import annotations

import json

import gradio as gr

from modules.ui.common import CLEAR_SYMBOL, PASTE_SYMBOL, RANDOM_SYMBOL, REFRESH_SYMBOL, REUSE_SYMBOL, SWAP_SYMBOL
from modules.ui.generation import APPLY_STYLE_SYMBOL, EDIT_STYLE_SYMBOL

TOOLTIPS = {
    PASTE_SYMBOL: "Read generation parameters from the prompt (or, when it is empty, from the last image) into the page",
    CLEAR_SYMBOL: "Clear the prompt and negative prompt",
    APPLY_STYLE_SYMBOL: "Apply the selected styles to the prompts",
    EDIT_STYLE_SYMBOL: "Create or edit a style",
    RANDOM_SYMBOL: "Set the seed to -1: a new random seed every time",
    REUSE_SYMBOL: "Reuse the seed of the selected image",
    REFRESH_SYMBOL: "Refresh the list",
    SWAP_SYMBOL: "Swap width and height",
}


def ui_theme() -> gr.themes.Base:
    # System fonts only: the page must not fetch anything (Google Fonts included) from the network.
    return gr.themes.Default(primary_hue="orange", secondary_hue="slate", neutral_hue="slate",
                             font=["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "sans-serif"],
                             font_mono=["ui-monospace", "SFMono-Regular", "Consolas", "monospace"],
                             spacing_size="sm", radius_size="sm")


CSS = """
.gradio-container { max-width: 1600px !important; }
#quicksettings { gap: .4em; align-items: end; }
#quicksettings > * { min-width: 0; }
button.tool { max-width: 2.6em !important; min-width: 2.6em !important; height: 2.6em; padding: 0 !important;
              font-size: 1.15em; line-height: 1; align-self: end; }
.athanor-compact-row { gap: .35em !important; flex-wrap: nowrap !important; }
.athanor-tools { justify-content: flex-start; }
.athanor-prompt-wrap { position: relative; }
.athanor-token-counter { position: absolute !important; top: .3em; right: .6em; z-index: 20; font-size: .75em;
                         pointer-events: none; padding: 0 .35em !important; border-radius: 4px;
                         background: var(--block-background-fill); color: var(--body-text-color-subdued);
                         min-height: 0 !important; width: auto !important; }
.athanor-token-counter > * { min-height: 0 !important; padding: 0 !important; }
[id$="_generate"] { min-height: 3.4em; font-size: 1.1em; }
.athanor-progress { position: relative; border: 1px solid var(--border-color-primary); border-radius: 6px;
                    min-height: 1.7em; line-height: 1.7em; overflow: hidden; font-size: .9em;
                    background: var(--block-background-fill); }
.athanor-progress-bar { position: absolute; left: 0; top: 0; bottom: 0; background: var(--color-accent);
                        opacity: .35; transition: width .2s linear; }
.athanor-progress span { position: relative; padding-left: .6em; }
.athanor-progress.athanor-done, .athanor-progress[data-status='cancelled'] { padding-left: .6em; }
.athanor-progress.athanor-failed { padding-left: .6em; border-color: #dc2626; color: #dc2626; }
.athanor-progress.athanor-queued span { color: var(--body-text-color-subdued); }
.athanor-preview-frame { height: 420px; display: flex; align-items: center; justify-content: center;
                         border: 1px solid var(--border-color-primary); border-radius: var(--block-radius);
                         background: var(--block-background-fill); }
.athanor-preview-frame img { width: 100%; height: 100%; object-fit: contain; }
.athanor-info { font-size: .85em; }
.athanor-infotext { white-space: pre-wrap; word-break: break-word; margin: .3em 0; font-size: .95em;
                    background: transparent; border: 0; padding: 0; }
.athanor-seed { color: var(--body-text-color-subdued); }
.athanor-path { font-size: .8em; color: var(--body-text-color-subdued); word-break: break-all; }
.athanor-image-buttons { gap: .35em !important; flex-wrap: wrap; }
.athanor-image-buttons > * { flex: 1 1 auto; }
.athanor-notice { border-left: 4px solid #2563eb; padding: .4em .8em; margin: .2em 0; border-radius: 3px;
                  background: rgba(37, 99, 235, .08); }
.athanor-warning { border-left-color: #d97706; background: rgba(217, 119, 6, .1); }
.athanor-error { border-left-color: #dc2626; background: rgba(220, 38, 38, .1); }
.athanor-error-text { color: #dc2626; }
.athanor-muted { color: var(--body-text-color-subdued); font-size: .9em; }
.athanor-pnginfo pre { white-space: pre-wrap; word-break: break-word; font-size: .85em; margin: 0 0 .6em 0; }
.athanor-pnginfo p { margin: .2em 0; }
table.athanor-table { border-collapse: collapse; width: 100%; font-size: .9em; }
table.athanor-table th, table.athanor-table td { border-bottom: 1px solid var(--border-color-primary);
                                                 padding: .3em .5em; text-align: left; }
@media (max-width: 640px) {
  .gradio-container { padding: 0 .4em !important; }
  #quicksettings { flex-wrap: wrap; }
  #quicksettings > div { flex: 1 1 70% !important; }
  .athanor-toprow { flex-direction: column; }
  .athanor-toprow > * { width: 100% !important; max-width: 100% !important; flex: 1 1 auto !important; }
  #quicksettings button.tool { margin-bottom: .3em; }
}
"""

_SCRIPT = """
(() => {
  const TOOLTIPS = __TOOLTIPS__;
  let scheduled = false;
  function addTitles() {
    scheduled = false;
    document.querySelectorAll('button.tool').forEach((b) => {
      const tip = TOOLTIPS[b.textContent.trim()];
      if (tip && !b.title) { b.title = tip; b.setAttribute('aria-label', tip); }
    });
  }
  new MutationObserver(() => {
    if (!scheduled) { scheduled = true; requestAnimationFrame(addTitles); }
  }).observe(document.documentElement, { childList: true, subtree: true });
  // Ctrl+Enter (Cmd+Enter) in a prompt box presses that tab's Generate button, as in A1111.
  document.addEventListener('keydown', (e) => {
    if (!(e.key === 'Enter' && (e.ctrlKey || e.metaKey))) return;
    const box = e.target && e.target.closest && e.target.closest('[id$="_prompt"]');
    if (!box) return;
    const tab = box.id.replace(/_(neg_)?prompt$/, '');
    const button = document.getElementById(tab + '_generate');
    if (button) { e.preventDefault(); button.click(); }
  });
})();
"""


def page_script() -> str:
    return _SCRIPT.replace("__TOOLTIPS__", json.dumps(TOOLTIPS, ensure_ascii=False))
