"""``progress_ssl.png``: every quantity readable on its own scale, every axis labelled, one font scheme."""
import math

import matplotlib

matplotlib.use("agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from nnunet_ssl.progress import OTHER_GROUP, SSLProgressLog, build_figure, split_by_scale  # noqa: E402

EPOCHS = 40
GROUPS = {"losses": ["sup_loss", "unsup_loss"], "unsupervised weight": ["lambda"],
          "confidence mask (FixMatch)": ["mask_ratio", "mask_ratio_0", "mask_ratio_1"]}


def _values() -> dict:
    """What a Mean Teacher / FixMatch run logs: the supervised loss (Dice + CE) falls from 0.2 to -0.8, the
    unsupervised one from 0.02 to 0.0005, lambda ramps to 0.1; one key belongs to no group."""
    t = [e / (EPOCHS - 1) for e in range(EPOCHS)]
    return {
        "sup_loss": [0.2 - 1.0 * (1 - math.exp(-4 * x)) for x in t],
        "unsup_loss": [0.02 * math.exp(-3.7 * x) for x in t],
        "lambda": [0.1 * math.exp(-5 * (1 - min(x / 0.6, 1)) ** 2) for x in t],
        "mask_ratio": [0.3 + 0.6 * x for x in t],
        "mask_ratio_0": [0.4 + 0.6 * x for x in t],
        "mask_ratio_1": [0.2 + 0.5 * x for x in t],
        "nonfinite_steps_total": [0.0] * EPOCHS,
    }


@pytest.fixture
def figure():
    fig = build_figure(_values(), GROUPS)
    yield fig
    plt.close(fig)


def _axes(fig):
    return [ax for ax in fig.axes if ax.get_visible()]


def _keys(ax):
    return {line.get_label() for line in ax.get_lines()}


def test_supervised_and_unsupervised_loss_do_not_share_an_axis(figure):
    sup = [ax for ax in _axes(figure) if "supervised loss" in _keys(ax)]
    unsup = [ax for ax in _axes(figure) if "unsupervised loss" in _keys(ax)]
    assert len(sup) == len(unsup) == 1 and sup[0] is not unsup[0]
    assert unsup[0].get_yscale() == "log"  # 0.02 .. 0.0005 spans decades
    assert sup[0].get_yscale() == "linear"  # negative values
    lo, hi = unsup[0].get_ylim()
    assert lo < 0.0005 and hi > 0.02 and hi / lo < 1000  # the curve fills its axis


def test_every_panel_has_title_and_axis_labels(figure):
    axes = _axes(figure)
    assert len(axes) == 5  # two loss panels, lambda, FixMatch mask, the ungrouped key
    for ax in axes:
        assert ax.get_title() and ax.get_xlabel() == "epoch" and ax.get_ylabel(), ax
    by_title = {ax.get_title(): ax for ax in axes}
    assert by_title["unsupervised weight"].get_ylabel() == "λ(t)"
    assert by_title["confidence mask (FixMatch)"].get_ylabel() == "fraction"
    assert _keys(by_title[OTHER_GROUP]) == {"non-finite steps skipped (total)"}  # logged, in no group: still shown


def test_fonts_are_one_scheme_even_after_nnunets_seaborn_settings():
    import seaborn

    # what nnU-Net's progress.png plotting leaves behind in the training process: seaborn, font_scale 2.5
    with plt.rc_context({**seaborn.axes_style("darkgrid"), **seaborn.plotting_context(font_scale=2.5)}):
        fig = build_figure(_values(), GROUPS)
    sizes = set()
    for ax in _axes(fig):
        assert ax.get_facecolor()[:3] == (1.0, 1.0, 1.0)  # matplotlib's own style, not seaborn's grey
        sizes.add(ax.title.get_fontsize())
        sizes.add(ax.yaxis.label.get_fontsize())
        sizes.update(t.get_fontsize() for t in ax.get_yticklabels())
        if ax.get_legend():
            sizes.update(t.get_fontsize() for t in ax.get_legend().get_texts())
    plt.close(fig)
    assert max(sizes) <= 10 and max(sizes) - min(sizes) <= 2, sizes


def test_epochs_are_whole_numbers(figure):
    for ax in _axes(figure):
        assert all(float(t).is_integer() for t in ax.get_xticks())


def test_split_by_scale():
    v = {"a": [0.9, 0.5], "b": [0.3, 0.2], "c": [0.02, 0.01], "z": [0.0, 0.0], "n": [float("nan")] * 2}
    assert split_by_scale(v, ["c", "a", "b", "z"]) == [["a", "b", "z"], ["c"]]


def test_plot_writes_the_png_atomically(tmp_path):
    log = SSLProgressLog()
    for epoch in range(EPOCHS):
        log.log_epoch(epoch, {k: v[epoch] for k, v in _values().items()})
    path = tmp_path / "progress_ssl.png"
    log.plot(str(path), GROUPS)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    assert [p.name for p in tmp_path.iterdir()] == ["progress_ssl.png"]


def test_nothing_logged_draws_nothing(tmp_path):
    SSLProgressLog().plot(str(tmp_path / "p.png"), GROUPS)
    assert not (tmp_path / "p.png").exists()
    assert build_figure({"sup_loss": [float("nan")]}, GROUPS) is None


def test_the_png_does_not_depend_on_the_styles_a_training_process_set(tmp_path):
    import seaborn

    log = SSLProgressLog()
    for epoch in range(EPOCHS):
        log.log_epoch(epoch, {k: v[epoch] for k, v in _values().items()})
    log.plot(str(tmp_path / "plain.png"), GROUPS)
    with plt.rc_context({**seaborn.axes_style("darkgrid"), **seaborn.plotting_context(font_scale=2.5)}):
        log.plot(str(tmp_path / "after_nnunet.png"), GROUPS)
    assert (tmp_path / "plain.png").read_bytes() == (tmp_path / "after_nnunet.png").read_bytes()


def test_epoch_history_keeps_the_diagnostic_curves_every_kth_epoch():
    from nnunet_ssl.progress import epoch_history

    n = 250  # max_points 100 -> every 3rd epoch (ceil 2.5), plus the last one when the stride misses it
    log = {"train_losses": [float(e) for e in range(n)], "mean_fg_dice": [e / 1000 for e in range(n)],
           "lrs": [0.01] * n}
    ssl = {"sup_loss": [1 / 3] * n, "u_fg_weight_s": [float("nan")] * 10 + [2.0] * (n - 10),
           "metassl_lamLl_over_sup": [0.5] * n, "u_frac_UC": [0.1] * n, "fixmatch_tau_1": [0.9] * 5}
    h = epoch_history(log, ssl)
    # 0, 3, ..., 249 = 3 * 83: 84 epochs, the last one included by the stride
    assert h["epoch"][:3] == [0, 3, 6] and h["epoch"][-2:] == [246, 249] and len(h["epoch"]) == 84
    assert h["train_loss"][:2] == [0.0, 3.0] and h["train_loss"][-1] == 249.0
    assert h["pseudo_dice"][-1] == 0.249
    assert h["sup_loss"][0] == 0.3333                      # 4 significant digits
    assert h["u_fg_weight_s"][:4] == [None, None, None, None] and h["u_fg_weight_s"][4] == 2.0  # NaN -> None
    assert h["fixmatch_tau_1"] == [0.9, 0.9] + [None] * 82  # a short series is padded, not misaligned
    assert "u_frac_UC" not in h and "lrs" not in h          # only the chosen keys
    assert epoch_history({"train_losses": [], "mean_fg_dice": []}, {}) == {}
    short = epoch_history({"train_losses": [1.0, 0.5], "mean_fg_dice": [0.2, 0.4]}, {})
    assert short == {"epoch": [0, 1], "train_loss": [1.0, 0.5], "pseudo_dice": [0.2, 0.4]}
    odd = epoch_history({"train_losses": [float(e) for e in range(201)]}, {})  # stride 3 misses 200: appended
    assert odd["epoch"][-2:] == [198, 200] and len(odd["epoch"]) == 68 and "pseudo_dice" not in odd
