//! The events a run sends: one shape per workload, each with a client-chosen id so the
//! run can check afterwards that every acknowledged event reached the sink.

use serde_json::{Value, json};

/// What the events look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Shape {
    /// A page visit report: `{userId, page, ms}`.
    Visit,
    /// An activity report: `{userId, activity, count}`.
    Activity,
    /// A chat message: `{fromuser, touser, msg}`.
    Chat,
    /// A ride data point: `{rideId, lat, lon, speed}`.
    Ride,
    /// A TCP store record: `{id, name, age}` (strings, as the workshop's client sends).
    Record,
}

const PAGES: [&str; 5] = ["/", "/products", "/pricing", "/cart", "/checkout"];
const ACTIVITIES: [&str; 4] = ["login", "search", "purchase", "logout"];

/// The `n`-th event of run `run`, with the id `<run>-<n>`.
pub fn event(shape: Shape, run: &str, n: u64) -> Value {
    let id = format!("{run}-{n}");
    let user = format!("user-{}", n % 1000);
    let pick = |len: usize| (n % len as u64) as usize;
    match shape {
        Shape::Visit => {
            json!({"id": id, "userId": user, "page": PAGES[pick(PAGES.len())], "ms": 100 + n % 5000})
        }
        Shape::Activity => {
            json!({"id": id, "userId": user, "activity": ACTIVITIES[pick(ACTIVITIES.len())], "count": 1 + n % 10})
        }
        Shape::Chat => {
            json!({"id": id, "fromuser": user, "touser": format!("user-{}", (n * 7 + 3) % 1000), "msg": format!("message {n}")})
        }
        Shape::Ride => json!({
            "id": id,
            "rideId": format!("ride-{}", n % 200),
            "lat": 52.37 + (n % 1000) as f64 / 10_000.0,
            "lon": 4.89 + (n % 977) as f64 / 10_000.0,
            "speed": (n % 120) as f64,
        }),
        Shape::Record => {
            json!({"id": id, "name": format!("User {n}"), "age": (18 + n % 60).to_string()})
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_has_its_own_id_and_the_fields_of_its_shape() {
        let a = event(Shape::Visit, "r1", 7);
        let b = event(Shape::Visit, "r1", 8);
        assert_eq!(a["id"], "r1-7");
        assert_ne!(a["id"], b["id"]);
        assert!(a["userId"].is_string() && a["page"].is_string());
        let chat = event(Shape::Chat, "r1", 1);
        assert!(chat["fromuser"].is_string() && chat["touser"].is_string());
        let record = event(Shape::Record, "r1", 2);
        assert_eq!(record["age"], "20", "the TCP client sends strings");
        assert!(event(Shape::Ride, "r", 3)["lat"].is_f64());
        assert!(event(Shape::Activity, "r", 3)["activity"].is_string());
    }
}
