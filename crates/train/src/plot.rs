//! The loss-curve plot (`loss.svg` in the run folder), drawn with `plotters`' SVG backend:
//! training loss per step, validation loss at each evaluation, and the corpus's loss floor when
//! it is known.

use plotters::prelude::*;

/// (step, loss) points.
pub type Series = Vec<(f64, f64)>;

/// Parses `metrics.jsonl` text into (train: (step, loss), val: (step, val_loss)).
pub fn parse_metrics(text: &str) -> (Series, Series) {
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(step) = v["step"].as_f64() else {
            continue;
        };
        if let Some(l) = v["loss"].as_f64() {
            train.push((step, l));
        }
        if let Some(l) = v["val_loss"].as_f64() {
            val.push((step, l));
        }
    }
    (train, val)
}

/// An SVG document plotting the metrics in `metrics_jsonl` (and `floor`, if given).
pub fn loss_svg(metrics_jsonl: &str, floor: Option<f64>) -> String {
    let (train, val) = parse_metrics(metrics_jsonl);
    let mut svg = String::new();
    let result = draw(&mut svg, &train, &val, floor);
    if let Err(e) = result {
        return format!("<svg xmlns=\"http://www.w3.org/2000/svg\"><text x=\"10\" y=\"20\">plot failed: {e}</text></svg>");
    }
    svg
}

fn draw(
    svg: &mut String,
    train: &[(f64, f64)],
    val: &[(f64, f64)],
    floor: Option<f64>,
) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::with_string(svg, (900, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let all = train.iter().chain(val);
    let x_max = all.clone().map(|p| p.0).fold(1.0, f64::max);
    let mut y_max = all.clone().map(|p| p.1).fold(f64::MIN, f64::max);
    let mut y_min = all.map(|p| p.1).fold(f64::MAX, f64::min);
    if let Some(f) = floor {
        y_min = y_min.min(f);
    }
    if y_max < y_min {
        (y_min, y_max) = (0.0, 1.0);
    }
    let pad = 0.05 * (y_max - y_min).max(1e-3);
    let mut chart = ChartBuilder::on(&root)
        .caption("loss (nats/token)", ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max, (y_min - pad)..(y_max + pad))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss")
        .draw()?;
    chart
        .draw_series(LineSeries::new(train.iter().copied(), &BLUE))?
        .label("train")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    chart
        .draw_series(LineSeries::new(val.iter().copied(), RED.stroke_width(2)))?
        .label("validation")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    if let Some(f) = floor {
        chart
            .draw_series(LineSeries::new(vec![(0.0, f), (x_max, f)], &BLACK))?
            .label(format!("floor {f:.3}"))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svg_has_both_curves_the_floor_and_the_legend() {
        let mut m = String::new();
        for s in 1..=50 {
            m.push_str(&format!(
                "{{\"step\":{s},\"loss\":{}}}\n",
                3.0 / s as f64 + 1.0
            ));
            if s % 10 == 0 {
                m.push_str(&format!(
                    "{{\"step\":{s},\"val_loss\":{}}}\n",
                    3.0 / s as f64 + 1.1
                ));
            }
        }
        m.push_str("not json\n");
        let (train, val) = parse_metrics(&m);
        assert_eq!((train.len(), val.len()), (50, 5));
        let svg = loss_svg(&m, Some(0.9));
        assert!(svg.starts_with("<svg"), "{}", &svg[..50]);
        assert!(
            svg.matches("<polyline").count() >= 3,
            "train, validation and floor lines"
        );
        for s in ["train", "validation", "floor 0.900", "step"] {
            assert!(svg.contains(s), "missing {s}");
        }
    }
}
