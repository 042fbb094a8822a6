//! One picture per scenario run: a panel per variant, stacked on the same time
//! and memory axes, so guard on and guard off compare at a glance. Each panel
//! shows the server's RSS and its cgroup's working set over time, the guard's
//! reserved bytes, the cgroup limit and the guard's budget, and marks for the
//! guard's admissions, rejections and purges and for OOM kills.

use std::path::Path;

use plotters::prelude::*;

use super::{
    BUDGET, FONT, GREY, LIMIT, PURGE, RESERVED, RSS, WORKING_SET, err, increments,
    legend::{self, Swatch},
};
use crate::{mib, timeline::Sample};

const WIDTH: u32 = 1600;
const HEADER: u32 = 96;
const PANEL: u32 = 540;
const LEGEND: u32 = 390;

/// One variant's panel.
pub struct Panel<'a> {
    /// "guard on", "guard off".
    pub title: String,
    pub samples: &'a [Sample],
    pub limit: Option<u64>,
    /// What the limit is: "cgroup limit", or "memory limit (guard's)" for a
    /// server the bench did not put in a cgroup.
    pub limit_label: String,
    pub budget: Option<u64>,
    /// Whether the budget is enforced (the guard is on).
    pub guard_on: bool,
    /// When the first call started.
    pub load_start: Option<f64>,
    /// Key figures, one per line; the first is drawn bold.
    pub facts: Vec<String>,
}

/// Draws `panels` one above the other into a PNG at `path`.
pub fn draw(path: &Path, title: &str, subtitle: &str, panels: &[Panel]) -> anyhow::Result<()> {
    super::fonts();
    let height = HEADER + PANEL * panels.len().max(1) as u32;
    let root = BitMapBackend::new(path, (WIDTH, height)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (header, body) = root.split_vertically(HEADER);
    let big = TextStyle::from((FONT, 30, FontStyle::Bold).into_font()).color(&BLACK);
    let grey = BLACK.mix(0.8);
    let small = TextStyle::from((FONT, 19).into_font()).color(&grey);
    header.draw_text(title, &big, (24, 14)).map_err(err)?;
    header.draw_text(subtitle, &small, (24, 58)).map_err(err)?;

    // Shared axes: the longest run, the largest of limit and data.
    let t_max = panels
        .iter()
        .filter_map(|p| p.samples.last().map(|s| s.t))
        .fold(1.0, f64::max);
    let limit = panels.iter().filter_map(|p| p.limit).max();
    let data_max = panels
        .iter()
        .flat_map(|p| p.samples)
        .flat_map(|s| [s.rss, s.working_set, s.guard.reserved])
        .flatten()
        .max()
        .unwrap_or(0);
    let top = limit.unwrap_or(data_max).max(data_max).max(1);
    // Above the top line: three rows of event marks.
    let y_max = mib(top) * 1.24;
    let rows = [mib(top) * 1.06, mib(top) * 1.12, mib(top) * 1.18];

    for (area, panel) in body
        .split_evenly((panels.len().max(1), 1))
        .iter()
        .zip(panels)
    {
        let (plot, side) = area.split_horizontally(WIDTH - LEGEND);
        let mut chart = ChartBuilder::on(&plot)
            .caption(&panel.title, (FONT, 24, FontStyle::Bold))
            .margin_left(16)
            .margin_right(8)
            .margin_top(6)
            .x_label_area_size(56)
            .y_label_area_size(84)
            .build_cartesian_2d(0f64..t_max, 0f64..y_max)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("time since the server was ready (s)")
            .y_desc("memory (MiB)")
            .x_label_formatter(&|v| {
                if t_max >= 5.0 {
                    format!("{v:.0}")
                } else {
                    format!("{v:.1}")
                }
            })
            .y_label_formatter(&|v| format!("{v:.0}"))
            .label_style((FONT, 17))
            .axis_desc_style((FONT, 19))
            .light_line_style(BLACK.mix(0.04))
            .bold_line_style(BLACK.mix(0.12))
            .draw()
            .map_err(err)?;

        let series = |f: fn(&Sample) -> Option<u64>| {
            panel
                .samples
                .iter()
                .filter_map(move |s| f(s).map(|v| (s.t, mib(v))))
                .collect::<Vec<_>>()
        };
        let hline = |y: u64| vec![(0.0, mib(y)), (t_max, mib(y))];
        let mut entries = Vec::new();
        if let Some(t) = panel.load_start {
            chart
                .draw_series(DashedLineSeries::new(
                    vec![(t, 0.0), (t, mib(top))],
                    6,
                    6,
                    GREY.stroke_width(1),
                ))
                .map_err(err)?;
            entries.push((Swatch::Dashed(GREY), "first call starts".to_string()));
        }
        if let Some(limit) = panel.limit {
            chart
                .draw_series(DashedLineSeries::new(
                    hline(limit),
                    12,
                    6,
                    LIMIT.stroke_width(2),
                ))
                .map_err(err)?;
            entries.push((
                Swatch::Dashed(LIMIT),
                format!("{} ({:.0} MiB)", panel.limit_label, mib(limit)),
            ));
        }
        if let Some(budget) = panel.budget {
            chart
                .draw_series(DashedLineSeries::new(
                    hline(budget),
                    4,
                    4,
                    BUDGET.stroke_width(2),
                ))
                .map_err(err)?;
            let enforced = if panel.guard_on { "" } else { ", not enforced" };
            entries.push((
                Swatch::Dashed(BUDGET),
                format!("guard budget ({:.0} MiB{enforced})", mib(budget)),
            ));
        }
        for (color, f, label) in [
            (
                RESERVED,
                (|s: &Sample| s.guard.reserved) as fn(&Sample) -> Option<u64>,
                "guard reserved",
            ),
            (
                WORKING_SET,
                |s: &Sample| s.working_set,
                "cgroup working set",
            ),
            (RSS, |s: &Sample| s.rss, "server RSS"),
        ] {
            let points = series(f);
            if !points.is_empty() {
                chart
                    .draw_series(LineSeries::new(points, color.stroke_width(2)))
                    .map_err(err)?;
                entries.push((Swatch::Line(color), label.to_string()));
            }
        }

        let marks =
            |f: fn(&Sample) -> Option<u64>| increments(panel.samples.iter().map(|s| (s.t, f(s))));
        let admitted = marks(|s| s.guard.admitted);
        let rejected = marks(|s| s.guard.rejected);
        let purged = marks(|s| s.guard.purges);
        chart
            .draw_series(
                admitted
                    .iter()
                    .map(|&t| TriangleMarker::new((t, rows[0]), 6, WORKING_SET.filled())),
            )
            .map_err(err)?;
        chart
            .draw_series(
                rejected
                    .iter()
                    .map(|&t| Cross::new((t, rows[1]), 5, LIMIT.stroke_width(2))),
            )
            .map_err(err)?;
        chart
            .draw_series(
                purged
                    .iter()
                    .map(|&t| Circle::new((t, rows[2]), 4, PURGE.filled())),
            )
            .map_err(err)?;
        entries.push((Swatch::Triangle(WORKING_SET), "admission (guard)".into()));
        entries.push((
            Swatch::Cross(LIMIT),
            "rejection (RESOURCE_EXHAUSTED)".into(),
        ));
        entries.push((Swatch::Dot(PURGE), "jemalloc purge".into()));

        let kills = marks(|s| s.oom_kills);
        chart
            .draw_series(
                kills
                    .iter()
                    .map(|&t| PathElement::new(vec![(t, 0.0), (t, y_max)], LIMIT.stroke_width(4))),
            )
            .map_err(err)?;
        if !kills.is_empty() {
            entries.push((Swatch::Bar(LIMIT), "OOM kill".into()));
        }
        legend::draw(&side, &entries, &panel.facts)?;
    }
    root.present().map_err(err)?;
    Ok(())
}
