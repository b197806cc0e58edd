//! Which queues the endpoint serves, with their Service Bus properties, and
//! how a client's link address names one.
//!
//! Queues are declared by flag or in a file in the format of Microsoft's
//! Service Bus emulator (`config.json`: `UserConfig.Namespaces[].Queues[]`
//! with `Name` and `Properties`), so an emulator setup carries over. A link
//! to anything else is refused with `amqp:not-found`, as Service Bus does.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use crate::queue::{QueueOptions, SubQueue};

/// The declared queues, looked up without regard to case as Service Bus does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Entities {
    /// Lower-cased name → (declared name, properties).
    queues: BTreeMap<String, (String, QueueOptions)>,
}

/// What a link address names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// The claims-based security node, `$cbs`.
    Cbs,
    /// A queue's messages, or its dead-letter queue's.
    Messages { queue: String, sub: SubQueue },
    /// A queue's management node (`<queue>[/$DeadLetterQueue]/$management`).
    Management { queue: String, sub: SubQueue },
}

impl Node {
    /// The queue it belongs to, if any.
    pub fn queue(&self) -> Option<&str> {
        match self {
            Node::Cbs => None,
            Node::Messages { queue, .. } | Node::Management { queue, .. } => Some(queue),
        }
    }
}

/// Why a configuration is refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {detail}")]
    Read { path: String, detail: String },
    #[error("{path}: {detail}")]
    Invalid { path: String, detail: String },
}

impl Entities {
    /// Declares (or re-declares) a queue.
    pub fn declare(&mut self, name: &str, options: QueueOptions) {
        self.queues.insert(name.to_ascii_lowercase(), (name.to_string(), options));
    }

    /// Every declared queue with its properties.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &QueueOptions)> {
        self.queues.values().map(|(name, options)| (name.as_str(), options))
    }

    pub fn is_empty(&self) -> bool {
        self.queues.is_empty()
    }

    /// Resolves a link address: a bare path (`orders`), or a URI
    /// (`amqps://host:port/orders`, as the Python SDK writes it). `None` for
    /// anything not declared.
    pub fn resolve(&self, address: &str) -> Option<Node> {
        let path = super::sas::entity_path(address);
        if path == "$cbs" {
            return Some(Node::Cbs);
        }
        let (path, management) = match path.strip_suffix("/$management") {
            Some(entity) => (entity, true),
            None => (path.as_str(), false),
        };
        let (queue, sub) = match path.strip_suffix("/$deadletterqueue") {
            Some(queue) => (queue, SubQueue::DeadLetter),
            None => (path, SubQueue::Active),
        };
        let (name, _) = self.queues.get(queue)?;
        let queue = name.clone();
        Some(if management { Node::Management { queue, sub } } else { Node::Messages { queue, sub } })
    }

    /// Reads queues from an emulator-style `config.json`.
    pub fn from_file(path: &Path, defaults: QueueOptions) -> Result<Entities, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::Read { path: shown.clone(), detail: e.to_string() })?;
        Self::from_json(&text, defaults).map_err(|detail| ConfigError::Invalid { path: shown, detail })
    }

    fn from_json(text: &str, defaults: QueueOptions) -> Result<Entities, String> {
        let root: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        let namespaces = root
            .pointer("/UserConfig/Namespaces")
            .and_then(serde_json::Value::as_array)
            .ok_or("no UserConfig.Namespaces array (the Service Bus emulator's config.json format)")?;
        let mut entities = Entities::default();
        for namespace in namespaces {
            if namespace.get("Topics").and_then(serde_json::Value::as_array).is_some_and(|t| !t.is_empty()) {
                return Err("topics are not supported; declare queues".into());
            }
            for queue in namespace.get("Queues").and_then(serde_json::Value::as_array).into_iter().flatten() {
                let name = queue.get("Name").and_then(serde_json::Value::as_str).ok_or("a queue without a Name")?;
                let properties = queue.get("Properties").cloned().unwrap_or_default();
                let options = queue_options(&properties, defaults).map_err(|e| format!("queue {name}: {e}"))?;
                entities.declare(name, options);
            }
        }
        if entities.is_empty() {
            return Err("it declares no queues".into());
        }
        Ok(entities)
    }
}

/// A queue's `Properties`, as the emulator spells them.
fn queue_options(properties: &serde_json::Value, defaults: QueueOptions) -> Result<QueueOptions, String> {
    let mut options = defaults;
    let text = |key: &str| properties.get(key).and_then(serde_json::Value::as_str);
    let flag = |key: &str| properties.get(key).and_then(serde_json::Value::as_bool).unwrap_or(false);
    for unsupported in ["RequiresSession", "RequiresDuplicateDetection"] {
        if flag(unsupported) {
            return Err(format!("{unsupported} is not supported"));
        }
    }
    for forward in ["ForwardTo", "ForwardDeadLetteredMessagesTo"] {
        if text(forward).is_some_and(|t| !t.is_empty()) {
            return Err(format!("{forward} is not supported"));
        }
    }
    if let Some(lock) = text("LockDuration") {
        options.lock_duration = iso_duration(lock)?.ok_or("LockDuration must be finite")?;
    }
    if let Some(count) = properties.get("MaxDeliveryCount") {
        let count = count.as_u64().filter(|c| *c >= 1).ok_or("MaxDeliveryCount must be a positive integer")?;
        options.max_delivery_count = u32::try_from(count).unwrap_or(u32::MAX);
    }
    if let Some(ttl) = text("DefaultMessageTimeToLive") {
        options.default_ttl = iso_duration(ttl)?;
    }
    if let Some(on) = properties.get("DeadLetteringOnMessageExpiration").and_then(serde_json::Value::as_bool) {
        options.dead_letter_on_expiry = on;
    }
    Ok(options)
}

/// An ISO 8601 duration (`PT1M`, `P14D`, `PT1H30M5.5S`). `None` for
/// durations so long they mean "forever" (.NET's TimeSpan.MaxValue,
/// `P10675199DT2H48M5.4775807S`, is what Service Bus reports for that).
fn iso_duration(text: &str) -> Result<Option<Duration>, String> {
    let bad = || format!("{text:?} is not an ISO 8601 duration such as PT1M");
    let rest = text.strip_prefix('P').ok_or_else(bad)?;
    let (days, time) = match rest.split_once('T') {
        Some((days, time)) => (days, time),
        None => (rest, ""),
    };
    let mut seconds = 0f64;
    let mut add = |part: &str, units: &[(char, f64)]| -> Result<(), String> {
        let mut number = String::new();
        for c in part.chars() {
            match units.iter().find(|(u, _)| *u == c) {
                Some((_, scale)) => {
                    seconds += number.parse::<f64>().map_err(|_| bad())? * scale;
                    number.clear();
                }
                None if c.is_ascii_digit() || c == '.' => number.push(c),
                None => return Err(bad()),
            }
        }
        if number.is_empty() { Ok(()) } else { Err(bad()) }
    };
    add(days, &[('D', 86_400.0), ('W', 604_800.0)])?;
    add(time, &[('H', 3_600.0), ('M', 60.0), ('S', 1.0)])?;
    if seconds.is_nan() || seconds <= 0.0 {
        return Err(format!("{text:?} is not a positive duration"));
    }
    Ok((seconds < 10_000.0 * 86_400.0).then(|| Duration::from_secs_f64(seconds)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_emulators_config_format_declares_queues() {
        let json = r#"{"UserConfig":{"Namespaces":[{"Name":"sbemulatorns","Queues":[
            {"Name":"Orders","Properties":{"DeadLetteringOnMessageExpiration":true,"DefaultMessageTimeToLive":"PT1H",
             "DuplicateDetectionHistoryTimeWindow":"PT20S","ForwardDeadLetteredMessagesTo":"","ForwardTo":"",
             "LockDuration":"PT30S","MaxDeliveryCount":3,"RequiresDuplicateDetection":false,"RequiresSession":false}},
            {"Name":"plain"}],"Topics":[]}],"Logging":{"Type":"File"}}}"#;
        let entities = Entities::from_json(json, QueueOptions::default()).unwrap();
        let orders = *entities.iter().find(|(n, _)| *n == "Orders").unwrap().1;
        assert_eq!(orders.lock_duration, Duration::from_secs(30));
        assert_eq!((orders.max_delivery_count, orders.default_ttl), (3, Some(Duration::from_secs(3600))));
        assert!(orders.dead_letter_on_expiry);
        assert_eq!(entities.iter().find(|(n, _)| *n == "plain").unwrap().1, &QueueOptions::default());
        for refused in [
            r#"{"UserConfig":{"Namespaces":[{"Queues":[{"Name":"s","Properties":{"RequiresSession":true}}]}]}}"#,
            r#"{"UserConfig":{"Namespaces":[{"Queues":[],"Topics":[{"Name":"t"}]}]}}"#,
            r#"{"UserConfig":{"Namespaces":[{"Queues":[{"Name":"q","Properties":{"LockDuration":"1 minute"}}]}]}}"#,
            r#"{"Queues":[]}"#,
        ] {
            assert!(Entities::from_json(refused, QueueOptions::default()).is_err(), "{refused}");
        }
    }

    #[test]
    fn addresses_resolve_as_each_sdk_writes_them() {
        let mut entities = Entities::default();
        entities.declare("Orders", QueueOptions::default());
        let messages = Some(Node::Messages { queue: "Orders".into(), sub: SubQueue::Active });
        assert_eq!(entities.resolve("orders"), messages);
        assert_eq!(entities.resolve("amqps://localhost:5672/ORDERS"), messages);
        assert_eq!(
            entities.resolve("orders/$DeadLetterQueue"),
            Some(Node::Messages { queue: "Orders".into(), sub: SubQueue::DeadLetter })
        );
        assert_eq!(
            entities.resolve("orders/$deadletterqueue/$management"),
            Some(Node::Management { queue: "Orders".into(), sub: SubQueue::DeadLetter })
        );
        assert_eq!(entities.resolve("$cbs"), Some(Node::Cbs));
        assert_eq!(entities.resolve("unknown"), None);
        assert_eq!(entities.resolve("orders/$Transfer/$DeadLetterQueue"), None);
    }

    #[test]
    fn iso_durations() {
        assert_eq!(iso_duration("PT1M"), Ok(Some(Duration::from_secs(60))));
        assert_eq!(iso_duration("P1DT1H0.5S"), Ok(Some(Duration::from_secs_f64(90_000.5))));
        assert_eq!(iso_duration("P10675199DT2H48M5.4775807S"), Ok(None));
        assert!(iso_duration("PT0S").is_err() && iso_duration("5M").is_err() && iso_duration("PT5X").is_err());
    }
}
