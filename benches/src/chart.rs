//! The PNG chart: per job, one bar per comparison (uniblk / peer of the main figure, and
//! the explicit comparisons of groups without uniblk, `systems::comparisons`), with the 1.0 line where the two
//! sides are equal.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use plotters::coord::types::{RangedCoordf64, RangedCoordi32};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{register_font, FontStyle};

use crate::jobs::JOBS;
use crate::machine::RunInfo;
use crate::report::{ComparisonRow, Row};
use crate::systems::has_uniblk;

const SIZE: (u32, u32) = (1400, 720);
/// Fonts tried in order; plotters' pure-Rust text renderer needs a TTF file
/// (Debian: fonts-dejavu-core).
const FONTS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
];
/// Ten distinct colours (matplotlib's tab10): one per series, none repeated in a full run.
const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(214, 39, 40),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];
/// Height of one legend line in pixels, and of the space around the plot (caption,
/// margins, x labels), for keeping the legend clear of the bars.
const LEGEND_LINE_PX: f64 = 20.0;
const OUTSIDE_PLOT_PX: f64 = 110.0;

/// One bar series: a peer in a group, with its ratio per job (JOBS order).
struct Series {
    label: String,
    ratios: Vec<Option<f64>>,
}

fn series(rows: &[Row], comparisons: &[ComparisonRow]) -> Vec<Series> {
    let mut out: Vec<Series> = Vec::new();
    // Groups without a `uniblk` system have no uniblk / peer ratios: their explicit
    // comparisons follow.
    let peers = rows
        .iter()
        .filter(|r| !r.sample.system.is_uniblk() && has_uniblk(r.sample.system.group));
    for row in peers {
        let sys = row.sample.system;
        let label = format!("{}: uniblk / {}", sys.group, sys.name);
        let idx = match out.iter().position(|s| s.label == label) {
            Some(i) => i,
            None => {
                out.push(Series {
                    label,
                    ratios: vec![None; JOBS.len()],
                });
                out.len() - 1
            }
        };
        if let Some(j) = JOBS.iter().position(|j| j.name == row.sample.job.name) {
            out[idx].ratios[j] = row.ratio;
        }
    }
    // Targets within a group that has uniblk repeat its uniblk / peer bars: left out.
    for c in comparisons
        .iter()
        .filter(|c| !has_uniblk(c.comparison.group))
    {
        let mut ratios = vec![None; JOBS.len()];
        if let Some(j) = JOBS.iter().position(|j| j.name == c.job.name) {
            ratios[j] = c.ratio;
        }
        out.push(Series {
            label: format!(
                "{}: {} (target {:.1})",
                c.comparison.group, c.comparison.label, c.comparison.target
            ),
            ratios,
        });
    }
    out
}

/// Loads a system font once for plotters' text.
fn load_font() -> Result<()> {
    let path = FONTS
        .iter()
        .find(|p| Path::new(p).is_file())
        .context("no TTF font found for the chart's text (apt-get install fonts-dejavu-core)")?;
    let bytes: &'static [u8] = Box::leak(std::fs::read(path)?.into_boxed_slice());
    register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("{path} is not a usable font"))
}

/// Draws the chart to `path` (PNG); `mode` (quick or full) goes in the title.
pub fn draw(
    path: &Path,
    info: &RunInfo,
    mode: &str,
    rows: &[Row],
    comparisons: &[ComparisonRow],
) -> Result<()> {
    load_font()?;
    let series = series(rows, comparisons);
    if series.is_empty() {
        return Err(anyhow!("no peer was measured: nothing to compare"));
    }
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let title = format!(
        "uniblk / peer, higher is better: {} run {} ({}, commit {})",
        mode, info.date, info.cpu_model, info.commit
    );
    plot(&root, &title, &series)?;
    root.present()
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

type Chart<'a, 'b> =
    ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordi32, RangedCoordf64>>;

/// Each job takes `stride` x units: a gap, two units per bar, a gap.
fn plot(root: &Area, title: &str, series: &[Series]) -> Result<()> {
    let stride = 2 * series.len() as i32 + 2;
    let width = stride * JOBS.len() as i32;
    let highest = series
        .iter()
        .flat_map(|s| s.ratios.iter().flatten())
        .fold(1.0f64, |a, &b| a.max(b));
    let top = y_top(highest, series.len());
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0..width, 0.0..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        // A key point per x unit, so the formatter can put each job's name mid-group.
        .x_labels(width as usize + 1)
        .x_label_formatter(&|x| job_label(*x, stride))
        .y_desc("ratio")
        .label_style(("sans-serif", 15))
        .draw()?;
    for (i, s) in series.iter().enumerate() {
        draw_bars(&mut chart, s, i, stride)?;
    }
    draw_parity_and_legend(&mut chart, width)
}

/// The top of the y axis: room above the highest bar (and its label) for the legend,
/// which sits in the upper right corner with one line per series and one for 1.0.
fn y_top(highest: f64, n_series: usize) -> f64 {
    let plot_px = SIZE.1 as f64 - OUTSIDE_PLOT_PX;
    let legend_px = (n_series as f64 + 1.0) * LEGEND_LINE_PX + 2.0 * LEGEND_LINE_PX;
    let free = (1.0 - legend_px / plot_px).max(0.3);
    highest * 1.08 / free
}

/// Series `i`'s bars, each with its value centred over it (a bar is two x units wide).
fn draw_bars(chart: &mut Chart, s: &Series, i: usize, stride: i32) -> Result<()> {
    let color = COLORS[i % COLORS.len()];
    let bars = bars(s, i as i32, stride);
    chart
        .draw_series(
            bars.iter()
                .map(|&(x, r)| Rectangle::new([(x, 0.0), (x + 2, r)], color.filled())),
        )?
        .label(s.label.clone())
        .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
    let style = ("sans-serif", 13)
        .into_font()
        .color(&BLACK)
        .pos(Pos::new(HPos::Center, VPos::Bottom));
    chart.draw_series(
        bars.iter()
            .map(|&(x, r)| Text::new(format!("{r:.2}"), (x + 1, r), style.clone())),
    )?;
    Ok(())
}

/// The 1.0 line (uniblk as fast as the peer) and the legend.
fn draw_parity_and_legend<'a, 'b: 'a>(chart: &mut Chart<'a, 'b>, width: i32) -> Result<()> {
    chart
        .draw_series(std::iter::once(PathElement::new(
            [(0, 1.0), (width, 1.0)],
            BLACK.stroke_width(2),
        )))?
        .label("1.0: as fast as the peer")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 14, y)], BLACK.stroke_width(2)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    Ok(())
}

/// (left x, ratio) of each measured bar of series number `i`.
fn bars(s: &Series, i: i32, stride: i32) -> Vec<(i32, f64)> {
    s.ratios
        .iter()
        .enumerate()
        .filter_map(|(j, r)| r.map(|r| (j as i32 * stride + 1 + 2 * i, r)))
        .collect()
}

/// The job's name under the middle of its bars, nothing elsewhere.
fn job_label(x: i32, stride: i32) -> String {
    let j = (x / stride) as usize;
    if x % stride == stride / 2 && j < JOBS.len() {
        JOBS[j].name.to_string()
    } else {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_legend_fits_above_the_highest_bar() {
        let plot_px = SIZE.1 as f64 - OUTSIDE_PLOT_PX;
        for (highest, n) in [(1.0, 1), (2.07, 10), (3.5, 6)] {
            let top = y_top(highest, n);
            let legend_px = (n as f64 + 3.0) * LEGEND_LINE_PX;
            let legend_bottom = top * (1.0 - legend_px / plot_px);
            assert!(
                highest * 1.08 <= legend_bottom + 1e-9,
                "{highest} with {n} series: bar top {} above legend {legend_bottom}",
                highest * 1.08
            );
        }
    }
}
