use super::*;

/// The committed CRD YAML must match the types; regenerate with `make crds`.
#[test]
fn committed_crd_yaml_is_fresh() {
    let committed = include_str!("../../charts/m3o-operator/crds/crds.yaml");
    let generated = crds_yaml().expect("CRDs serialize");
    assert!(
        committed == generated,
        "charts/m3o-operator/crds/crds.yaml is stale: run `make crds` and commit the result"
    );
}

#[test]
fn every_schema_property_has_a_description() {
    fn walk(path: &str, schema: &serde_json::Value, missing: &mut Vec<String>) {
        if let Some(props) = schema.get("properties").and_then(|p| p.as_object()) {
            for (name, prop) in props {
                let here = format!("{path}.{name}");
                let top_level =
                    path.is_empty() && ["apiVersion", "kind", "metadata"].contains(&name.as_str());
                if prop.get("description").is_none() && !top_level {
                    missing.push(here.clone());
                }
                walk(&here, prop, missing);
            }
        }
        if let Some(items) = schema.get("items") {
            walk(&format!("{path}[]"), items, missing);
        }
    }
    for crd in crds() {
        let schema = serde_json::to_value(&crd.spec.versions[0].schema).expect("schema");
        let mut missing = Vec::new();
        walk("", &schema["openAPIV3Schema"], &mut missing);
        assert!(
            missing.is_empty(),
            "{}: fields without description: {missing:?}",
            crd.spec.names.kind
        );
    }
}

#[test]
fn crds_share_group_category_and_status_subresource() {
    for crd in crds() {
        assert_eq!(crd.spec.group, GROUP);
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(
            crd.spec.names.categories.as_deref(),
            Some(&[CATEGORY.to_owned()][..])
        );
        let v = &crd.spec.versions[0];
        assert_eq!(v.name, VERSION);
        assert!(
            v.subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some()
        );
    }
}

#[test]
fn spec_defaults_match_the_contract() {
    let c: CustomerSpec =
        serde_json::from_value(serde_json::json!({"email": "a@b.co"})).expect("spec");
    assert_eq!(c.state, CustomerState::Active);
    assert_eq!(c.deletion_policy, DeletionPolicy::Delete);
    let k: ApiKeySpec = serde_json::from_value(serde_json::json!({
        "customerRef": {"name": "c"}, "description": "d", "scopes": ["*"]
    }))
    .expect("spec");
    assert_eq!(k.rotation_grace_period, "1h");
    assert_eq!(k.rotation_generation, 0);
    assert!(!k.blocked);
}

#[test]
fn customer_status_strings_round_trip() {
    for s in ["unverified", "verified", "active", "banned", "deleted"] {
        assert_eq!(CustomerStatusState::parse(s).map(|v| v.as_str()), Some(s));
    }
    assert_eq!(CustomerStatusState::parse("nope"), None);
}

#[test]
fn kind_constants_name_the_kinds() {
    use kube::Resource;
    assert_eq!(crate::kinds::CUSTOMER, Customer::kind(&()));
    assert_eq!(crate::kinds::SUBSCRIPTION, Subscription::kind(&()));
    assert_eq!(crate::kinds::API_KEY, ApiKey::kind(&()));
}
