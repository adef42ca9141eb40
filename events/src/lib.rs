//! Events of the m3o-operator (ARCHITECTURE.md, "Where each contract lives").
//!
//! * Protobuf schemas under `proto/<topic>/events.proto`, compiled into one module per
//!   topic ([`customers`]) with a `TOPIC` constant, so nobody hand-types a topic name.
//! * A transactional [`outbox`]: [`outbox::enqueue`] writes the event in the caller's
//!   Postgres transaction, so the event exists if and only if the change committed.
//! * A [`relay`] that publishes outbox rows, in `seq` order, to Redis Streams.
//! * A small [`consumer`] helper for downstream Rust services and tests.

pub mod consumer;
pub mod outbox;
pub mod relay;

/// Default prefix of Redis stream keys: the stream of topic `t` is `events:t`.
pub const DEFAULT_STREAM_PREFIX: &str = "events:";

/// Every topic, for whatever iterates over the streams (lag metrics).
pub const TOPICS: &[&str] = &[customers::TOPIC];

/// Value of the `content-type` field of every stream entry.
pub const CONTENT_TYPE: &str = "application/x-protobuf";

/// Redis stream key of `topic` under `prefix`: `<prefix><topic>`.
pub fn stream_key(prefix: &str, topic: &str) -> String {
    format!("{prefix}{topic}")
}

/// Topic `customers`: wire compatible with the M3O backend's customers events.
pub mod customers {
    include!(concat!(env!("OUT_DIR"), "/customers.rs"));

    /// The topic name (and the suffix of the Redis stream key).
    pub const TOPIC: &str = "customers";

    impl crate::TopicEvent for Event {
        const TOPIC: &'static str = TOPIC;

        fn event_type_name(&self) -> &'static str {
            self.r#type().as_str_name()
        }
    }
}

/// An event message of a topic: knows its topic and the name of its event type.
///
/// Implemented for each topic's `Event`, so [`outbox::OutboxMessage::from_event`] fills
/// the topic and the `type` field of the stream entry without hand-typed strings.
pub trait TopicEvent: prost::Message {
    /// The topic the event is published on.
    const TOPIC: &'static str;

    /// The event type's enum value name, e.g. `EventTypeCreated`.
    fn event_type_name(&self) -> &'static str;
}

#[cfg(test)]
mod tests {
    use super::customers::{self, Event, EventType};
    use prost::Message;

    #[test]
    fn enum_names_are_the_m3o_names() {
        assert_eq!(EventType::Created.as_str_name(), "EventTypeCreated");
        assert_eq!(
            EventType::SubscriptionChanged.as_str_name(),
            "EventTypeSubscriptionChanged"
        );
        assert_eq!(EventType::KeyRotated.as_str_name(), "EventTypeKeyRotated");
        assert_eq!(
            EventType::from_str_name("EventTypeBlockKey"),
            Some(EventType::BlockKey)
        );
    }

    #[test]
    fn enum_numbers_are_the_contract() {
        let expected = [
            (EventType::Unknown, 0),
            (EventType::Created, 1),
            (EventType::Updated, 2),
            (EventType::Deleted, 3),
            (EventType::Verified, 4),
            (EventType::Banned, 5),
            (EventType::Unbanned, 6),
            (EventType::Signup, 7),
            (EventType::GenerateKey, 8),
            (EventType::DeleteKey, 9),
            (EventType::AddPaymentMethod, 11),
            (EventType::DeletePaymentMethod, 12),
            (EventType::PasswordReset, 13),
            (EventType::Login, 14),
            (EventType::Logout, 15),
            (EventType::BlockKey, 16),
            (EventType::UnblockKey, 17),
            (EventType::BalanceIncrement, 18),
            (EventType::BalanceZero, 19),
            (EventType::BalanceDecrement, 20),
            (EventType::TokenRefresh, 21),
            (EventType::SubscriptionChanged, 22),
            (EventType::KeyRotated, 100),
            (EventType::KeyExpired, 101),
            (EventType::SubscriptionCancelled, 102),
            (EventType::QuotaThresholdReached, 103),
        ];
        for (ty, n) in expected {
            assert_eq!(ty as i32, n, "{}", ty.as_str_name());
        }
    }

    #[test]
    fn customer_event_encodes_to_hand_computed_bytes() {
        let event = Event {
            r#type: EventType::Created as i32,
            customer: Some(customers::Customer {
                id: "ab".into(),
                status: "ok".into(),
                created: 1,
                email: "e".into(),
                updated: 2,
                name: "n".into(),
                meta: [("k".to_owned(), "v".to_owned())].into(),
            }),
            caller_id: "c".into(),
            created: Some(customers::Created {}),
            ..Default::default()
        };
        #[rustfmt::skip]
        let expected: &[u8] = &[
            0x08, 0x01,                   // 1 type = Created
            0x12, 0x1a,                   // 2 customer, 26 bytes
              0x0a, 0x02, b'a', b'b',     //   1 id
              0x12, 0x02, b'o', b'k',     //   2 status
              0x18, 0x01,                 //   3 created
              0x32, 0x01, b'e',           //   6 email
              0x38, 0x02,                 //   7 updated
              0x42, 0x01, b'n',           //   8 name
              0x4a, 0x06,                 //   9 meta entry, 6 bytes
                0x0a, 0x01, b'k',         //     key
                0x12, 0x01, b'v',         //     value
            0x1a, 0x01, b'c',             // 3 caller_id
            0x22, 0x00,                   // 4 created (empty message)
        ];
        assert_eq!(event.encode_to_vec(), expected);
        assert_eq!(Event::decode(expected).ok(), Some(event));
    }

    #[test]
    fn key_and_subscription_payloads_encode_to_hand_computed_bytes() {
        let event = Event {
            r#type: EventType::KeyRotated as i32,
            generate_key: Some(customers::GenerateKey {
                scopes: vec!["x".into()],
                id: "k".into(),
            }),
            block_key: Some(customers::BlockKey {
                id: "b".into(),
                message: "abuse".into(),
            }),
            subscription_changed: Some(customers::SubscriptionChanged { tier: "t".into() }),
            project_id: "p".into(),
            key_rotated: Some(customers::KeyRotated {
                id: "n".into(),
                previous_id: "o".into(),
            }),
            key_expired: Some(customers::KeyExpired { id: "e".into() }),
            subscription_cancelled: Some(customers::SubscriptionCancelled { tier: "c".into() }),
            ..Default::default()
        };
        #[rustfmt::skip]
        let expected: &[u8] = &[
            0x08, 0x64,                               // 1 type = KeyRotated (100)
            0x5a, 0x06,                               // 11 generate_key
              0x0a, 0x01, b'x', 0x12, 0x01, b'k',     //    scopes, id
            0x9a, 0x01, 0x0a, 0x0a, 0x01, b'b',       // 19 block_key { id,
              0x12, 0x05, b'a', b'b', b'u', b's', b'e', //    message (2) }
            0xba, 0x01, 0x03, 0x0a, 0x01, b't',       // 23 subscription_changed { tier }
            0xc2, 0x01, 0x01, b'p',                   // 24 project_id
            0xa2, 0x06, 0x06,                         // 100 key_rotated
              0x0a, 0x01, b'n', 0x12, 0x01, b'o',     //    id, previous_id
            0xaa, 0x06, 0x03, 0x0a, 0x01, b'e',       // 101 key_expired { id }
            0xb2, 0x06, 0x03, 0x0a, 0x01, b'c',       // 102 subscription_cancelled { tier }
        ];
        assert_eq!(event.encode_to_vec(), expected);
    }

    #[test]
    fn topic_constant_and_stream_key() {
        assert_eq!(customers::TOPIC, "customers");
        assert_eq!(
            super::stream_key(super::DEFAULT_STREAM_PREFIX, customers::TOPIC),
            "events:customers"
        );
    }
}
