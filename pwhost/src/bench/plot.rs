//! The runtime matrix as a picture: time per request and per VM start on each engine, each
//! beside that engine's floor when one was measured, drawn with `plotters` into an SVG file.
//!
//! Both panels use a logarithmic axis: engines differ by orders of magnitude (a native plugin
//! answers in well under a microsecond, an interpreter in tens), and ratios, which are what the
//! figures are for, read as equal distances on it.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::EngineFigures;

/// The color of pwhost's bars.
const PWHOST: RGBColor = RGBColor(0x1f, 0x77, 0xb4);
/// The color of the floors' bars.
const FLOOR: RGBColor = RGBColor(0xbb, 0xbb, 0xbb);

/// One panel: a title, an axis label, and per engine pwhost's value and the floor's.
struct Panel<'a> {
    title: &'a str,
    unit: &'a str,
    values: Vec<(f64, Option<f64>)>,
}

/// Draws `figures` into an SVG file at `path`: two panels, ns per request and µs per VM start,
/// one group of bars per engine (pwhost, and its floor where the figures have one), with the
/// ratio to the floor written above pwhost's bar.
pub fn plot_matrix(figures: &[EngineFigures], title: &str, path: &Path) -> anyhow::Result<()> {
    anyhow::ensure!(!figures.is_empty(), "no figures to plot");
    let labels: Vec<&str> = figures.iter().map(|f| f.runtime.as_str()).collect();
    let panels = [
        Panel {
            title: "time per request",
            unit: "ns / request",
            values: figures
                .iter()
                .map(|f| (f.request_ns, f.floor_request_ns))
                .collect(),
        },
        Panel {
            title: "VM start (create, start, configure, drop)",
            unit: "µs / VM start",
            values: figures
                .iter()
                .map(|f| (f.vm_start_us, f.floor_vm_start_us))
                .collect(),
        },
    ];
    let width = (240 + 130 * figures.len() as u32).max(900);
    let canvas = SVGBackend::new(path, (width, 900)).into_drawing_area();
    canvas.fill(&WHITE).map_err(draw_error)?;
    let root = canvas
        .titled(title, ("sans-serif", 22))
        .map_err(draw_error)?;
    for (area, panel) in root.split_evenly((2, 1)).iter().zip(&panels) {
        draw_panel(&canvas, area, panel, &labels)?;
    }
    canvas.present().map_err(draw_error)?;
    Ok(())
}

fn draw_error<E: std::error::Error + Send + Sync>(error: DrawingAreaErrorKind<E>) -> anyhow::Error {
    anyhow::anyhow!("cannot draw the plot: {error}")
}

/// Draws one panel into `area`; `canvas` is the whole picture, in whose (absolute) pixels the
/// engine names are placed under their bars.
fn draw_panel(
    canvas: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    panel: &Panel<'_>,
    labels: &[&str],
) -> anyhow::Result<()> {
    let all = panel
        .values
        .iter()
        .flat_map(|(value, floor)| std::iter::once(*value).chain(*floor))
        .filter(|v| v.is_finite() && *v > 0.0);
    let (low, high) = all.fold((f64::INFINITY, 0.0f64), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    anyhow::ensure!(high > 0.0, "{}: no positive figure to plot", panel.title);
    // Whole decades around the data, with room above the tallest bar for its ratio.
    let bottom = 10f64.powf(low.log10().floor());
    let top = 10f64.powf((high * 2.0).log10().ceil());
    let engines = labels.len();
    // Engine `i` is centred on `x = i`: pwhost's bar left of it, the floor's right of it.
    let mut chart = ChartBuilder::on(area)
        .caption(panel.title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(80)
        .build_cartesian_2d(-0.5..engines as f64 - 0.5, (bottom..top).log_scale())
        .map_err(draw_error)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(TRANSPARENT)
        // Engine names are drawn under their groups below, not at the axis's own ticks.
        .x_labels(0)
        .y_label_formatter(&|v| {
            if *v >= 1.0 {
                format!("{v:.0}")
            } else {
                format!("{v}")
            }
        })
        .y_desc(panel.unit)
        .draw()
        .map_err(draw_error)?;
    let (pwhost_bars, floor_bars): (Vec<_>, Vec<_>) = panel
        .values
        .iter()
        .enumerate()
        .map(|(i, (value, floor))| {
            let x = i as f64;
            let pwhost = Rectangle::new([(x - 0.38, bottom), (x, *value)], PWHOST.filled());
            let floor = floor
                .filter(|f| *f > 0.0)
                .map(|f| Rectangle::new([(x, bottom), (x + 0.38, f)], FLOOR.filled()));
            (pwhost, floor)
        })
        .unzip();
    chart
        .draw_series(pwhost_bars)
        .map_err(draw_error)?
        .label("pwhost")
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], PWHOST.filled()));
    if floor_bars.iter().any(Option::is_some) {
        chart
            .draw_series(floor_bars.into_iter().flatten())
            .map_err(draw_error)?
            .label("floor (hand-written host on the engine's own API)")
            .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], FLOOR.filled()));
    }
    let annotations = panel.values.iter().enumerate().map(|(i, (value, floor))| {
        let shown = if *value < 10.0 {
            format!("{value:.1}")
        } else {
            format!("{value:.0}")
        };
        let text = match floor {
            Some(floor) if *floor > 0.0 => format!("{shown} · {:.2}×", value / floor),
            _ => shown,
        };
        Text::new(text, (i as f64 - 0.38, value * 1.15), ("sans-serif", 13))
    });
    chart.draw_series(annotations).map_err(draw_error)?;
    let style = ("sans-serif", 14)
        .into_font()
        .into_text_style(area)
        .pos(Pos::new(HPos::Center, VPos::Top));
    for (i, label) in labels.iter().enumerate() {
        let (x, y) = chart.backend_coord(&(i as f64, bottom));
        canvas
            .draw(&Text::new(label.to_string(), (x, y + 8), style.clone()))
            .map_err(draw_error)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(draw_error)?;
    Ok(())
}
