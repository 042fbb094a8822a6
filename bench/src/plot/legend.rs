//! A legend and a few key figures, drawn in a column of their own beside a
//! chart: plotters' built-in legend sits inside the plot and would hide data.

use plotters::{coord::Shift, prelude::*};

use super::{FONT, err};

/// What a legend row shows left of its text.
#[derive(Debug, Clone, Copy)]
pub enum Swatch {
    Line(RGBColor),
    Dashed(RGBColor),
    Triangle(RGBColor),
    Cross(RGBColor),
    Dot(RGBColor),
    /// A vertical bar: an event across the whole chart height.
    Bar(RGBColor),
    /// A light rectangle: a span of time.
    Shade(RGBColor),
}

const ROW: i32 = 28;
const TEXT_X: i32 = 62;

/// Draws `entries` from the top of `area`, then `facts` below them.
pub fn draw<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    entries: &[(Swatch, String)],
    facts: &[String],
) -> anyhow::Result<()> {
    let text = TextStyle::from((FONT, 17).into_font()).color(&BLACK);
    let mut y = 46;
    for (swatch, label) in entries {
        let mid = y + ROW / 2 - 4;
        match *swatch {
            Swatch::Line(c) => area
                .draw(&PathElement::new(
                    vec![(12, mid), (50, mid)],
                    c.stroke_width(3),
                ))
                .map_err(err)?,
            Swatch::Dashed(c) => {
                for x in [12, 28, 44] {
                    area.draw(&PathElement::new(
                        vec![(x, mid), (x + 8, mid)],
                        c.stroke_width(3),
                    ))
                    .map_err(err)?;
                }
            }
            Swatch::Triangle(c) => area
                .draw(&TriangleMarker::new((31, mid), 7, c.filled()))
                .map_err(err)?,
            Swatch::Cross(c) => area
                .draw(&Cross::new((31, mid), 6, c.stroke_width(2)))
                .map_err(err)?,
            Swatch::Dot(c) => area
                .draw(&Circle::new((31, mid), 5, c.filled()))
                .map_err(err)?,
            Swatch::Bar(c) => area
                .draw(&PathElement::new(
                    vec![(31, mid - 11), (31, mid + 11)],
                    c.stroke_width(4),
                ))
                .map_err(err)?,
            Swatch::Shade(c) => area
                .draw(&Rectangle::new(
                    [(14, mid - 9), (48, mid + 9)],
                    c.mix(0.25).filled(),
                ))
                .map_err(err)?,
        }
        area.draw_text(label, &text, (TEXT_X, y + 2)).map_err(err)?;
        y += ROW;
    }
    y += ROW / 2;
    let bold = TextStyle::from((FONT, 17, FontStyle::Bold).into_font()).color(&BLACK);
    for (i, fact) in facts.iter().enumerate() {
        let style = if i == 0 { &bold } else { &text };
        area.draw_text(fact, style, (12, y)).map_err(err)?;
        y += ROW - 4;
    }
    Ok(())
}
