//! `api/openapi.yaml` against the code: the route table, the request/response schemas, field names,
//! required fields, defaults and enum values. Any drift fails here.

use std::collections::BTreeSet;

use serde_json::{json, Map, Value};
use tern_api::types::{
    ConsoleMode, CpusInfo, DemoPayloadInfo, DeviceConfigInfo, MemoryInfo, MigrationIteration,
    MigrationPass, PayloadInfo, SerialInfo,
};
use tern_api::{
    DeviceInfo, DirtyPagesBySource, Endpoint, IommuCapabilities, MigrationMode, MigrationState,
    MigrationStatus, TimeoutStrategy, VmConfigInfo, VmInfo, VmReceiveMigrationData,
    VmSendMigrationData, VmState, VmmPingResponse,
};

fn spec() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml");
    let text = std::fs::read_to_string(path).expect("read openapi.yaml");
    serde_yaml_ng::from_str(&text).expect("openapi.yaml is valid YAML")
}

fn schema<'a>(spec: &'a Value, name: &str) -> &'a Value {
    spec["components"]["schemas"]
        .get(name)
        .unwrap_or_else(|| panic!("openapi.yaml has no schema {name}"))
}

/// Follows a `$ref` (or an `allOf` of one `$ref`) to its schema.
fn resolve<'a>(spec: &'a Value, node: &'a Value) -> &'a Value {
    let node = node.get("allOf").and_then(|all| all.get(0)).unwrap_or(node);
    match node.get("$ref").and_then(Value::as_str) {
        Some(r) => schema(spec, ref_name(r)),
        None => node,
    }
}

fn ref_name(r: &str) -> &str {
    r.strip_prefix("#/components/schemas/")
        .unwrap_or_else(|| panic!("unexpected $ref {r}"))
}

/// The properties the code emits: all but Cloud Hypervisor's fields tern accepts only at their
/// default (`x-tern-refused`), which its types do not carry.
fn property_names(spec: &Value, name: &str) -> BTreeSet<String> {
    schema(spec, name)["properties"]
        .as_object()
        .unwrap_or_else(|| panic!("schema {name} has no properties"))
        .iter()
        .filter(|(_, p)| p.get("x-tern-refused").is_none())
        .map(|(k, _)| k.clone())
        .collect()
}

fn keys(value: &Value) -> BTreeSet<String> {
    value
        .as_object()
        .expect("serialized to an object")
        .keys()
        .cloned()
        .collect()
}

/// A config with every optional part set, so nested types are checked too.
fn config_info() -> VmConfigInfo {
    VmConfigInfo {
        cpus: CpusInfo {
            boot_vcpus: 2,
            max_vcpus: 2,
        },
        memory: MemoryInfo { size: 1 << 30 },
        payload: PayloadInfo {
            kernel: Some("/k".into()),
            initramfs: Some("/i".into()),
            cmdline: Some("console=ttyS0".into()),
            demo: Some(DemoPayloadInfo {
                mib: 64,
                dirty_mib_per_s: 64,
                exit_after_s: Some(5),
            }),
        },
        serial: SerialInfo {
            mode: ConsoleMode::File,
            file: Some("/tmp/serial".into()),
        },
        devices: vec![DeviceConfigInfo {
            path: "/sys/bus/pci/devices/0000:00:04.0".into(),
            id: "edu0".into(),
        }],
        dirty_tracking: Some("log".into()),
    }
}

fn send_data() -> VmSendMigrationData {
    VmSendMigrationData::new("tcp:127.0.0.1:6000".parse().unwrap())
}

/// A pass with every collection filled, so nested types are checked too.
fn iteration() -> MigrationIteration {
    MigrationIteration {
        iteration: 2,
        pass: MigrationPass::Dirty,
        pages_sent: 100,
        bytes_sent: 409_600,
        duration_ms: 3,
        dirty_pages_by_source: DirtyPagesBySource {
            kvm: 90,
            vmm: 1,
            dma: 9,
        },
        dma_pages_by_device: [("hwpt 3: edu0".to_owned(), 9)].into(),
        expected_downtime_ms: 1,
        bandwidth_bytes_per_s: 1 << 30,
        cpu_throttle_percent: 20,
    }
}

fn migration_status() -> MigrationStatus {
    MigrationStatus {
        status: MigrationState::Active,
        dma_pages_by_device: [("hwpt 3: edu0".to_owned(), 9)].into(),
        iterations: vec![iteration()],
        downtime_limit_ms: Some(300),
        setup_steps: vec![tern_api::types::TimedStep {
            name: "memory slots".into(),
            us: 400,
        }],
        switchover: Some(tern_api::types::SwitchoverTimes {
            pause_us: 40,
            final_sync_us: 30,
            final_claim_us: 20,
            final_claimed_chunks: 2,
            final_pass_us: 300,
            state_save_us: 90,
            send_us: 500,
            destination_restore_us: 800,
            destination_start_us: 60,
            queued_at_pause_bytes: 0,
        }),
        switchover_steps: vec![tern_api::types::TimedStep {
            name: "vCPU sregs".into(),
            us: 70,
        }],
        devices: vec![tern_api::DeviceMigrationStatus {
            id: "mtty0".into(),
            precopy_bytes: 24,
            stop_copy_bytes: 72,
            stop_copy_us: 310,
            initial_data_acked: true,
            ..Default::default()
        }],
        ..MigrationStatus::default()
    }
}

#[test]
fn spec_paths_and_methods_match_the_route_table() {
    let spec = spec();
    assert_eq!(spec["servers"][0]["url"], "http://localhost/api/v1");
    let mut in_spec = BTreeSet::new();
    for (path, ops) in spec["paths"].as_object().expect("paths") {
        for method in ops.as_object().expect("operations").keys() {
            in_spec.insert((method.to_uppercase(), format!("/api/v1{path}")));
        }
    }
    let in_code: BTreeSet<_> = Endpoint::ALL
        .iter()
        .map(|e| (e.method().as_str().to_owned(), e.path()))
        .collect();
    assert_eq!(in_spec, in_code);
}

#[test]
fn spec_bodies_name_the_types_the_router_uses() {
    let spec = spec();
    for e in Endpoint::ALL {
        let op = &spec["paths"][format!("/{}", e.name())][e.method().as_str().to_lowercase()];
        let request = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            .as_str()
            .map(ref_name);
        assert_eq!(request, e.request_schema(), "{} request body", e.name());
        if e.request_schema().is_some() {
            assert_eq!(op["requestBody"]["required"], true, "{}", e.name());
            for code in ["400", "413"] {
                assert!(
                    op["responses"].get(code).is_some(),
                    "{} lacks {code}",
                    e.name()
                );
            }
        }
        let ok = op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
            .as_str()
            .map(ref_name);
        assert_eq!(ok, e.response_schema(), "{} 200 body", e.name());
        let no_content = op["responses"].get("204").is_some();
        assert_eq!(
            no_content,
            e.response_schema().is_none(),
            "{} 204",
            e.name()
        );
        assert!(
            op["responses"].get("default").is_some(),
            "{} default",
            e.name()
        );
    }
}

#[test]
fn every_ref_points_at_a_schema() {
    fn walk(spec: &Value, node: &Value) {
        match node {
            Value::Object(map) => {
                for (k, v) in map {
                    if k == "$ref" {
                        let r = v.as_str().expect("$ref is a string");
                        if let Some(resp) = r.strip_prefix("#/components/responses/") {
                            assert!(spec["components"]["responses"].get(resp).is_some(), "{r}");
                        } else {
                            schema(spec, ref_name(r));
                        }
                    } else {
                        walk(spec, v);
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|v| walk(spec, v)),
            _ => {}
        }
    }
    let spec = spec();
    walk(&spec, &spec);
}

#[test]
fn schema_fields_match_serialized_types() {
    let spec = spec();
    let iommu = IommuCapabilities::default();
    let device = DeviceInfo {
        iommu: Some(iommu.clone()),
        dma_dirty: Some(tern_api::types::DmaDirtyInfo::default()),
        dma_domain: Some(tern_api::types::DmaDomain {
            backend: "iommufd".into(),
            ioas: Some(1),
            hwpt: Some(2),
            dirty_tracking: true,
            devices: vec!["edu0".into()],
        }),
        ..DeviceInfo::default()
    };
    let cases: Vec<(&str, Value)> = vec![
        (
            "VmmPingResponse",
            serde_json::to_value(VmmPingResponse {
                build_version: String::new(),
                version: String::new(),
                pid: 0,
                features: vec![],
            })
            .unwrap(),
        ),
        (
            "VmInfo",
            serde_json::to_value(VmInfo {
                state: VmState::Running,
                config: config_info(),
                memory_actual_size: 1 << 30,
                devices: vec![device.clone()],
            })
            .unwrap(),
        ),
        ("VmConfigInfo", serde_json::to_value(config_info()).unwrap()),
        (
            "VmConfigInfo",
            serde_json::to_value(VmConfigInfo::default()).unwrap(),
        ),
        ("DeviceInfo", serde_json::to_value(&device).unwrap()),
        ("IommuCapabilities", serde_json::to_value(&iommu).unwrap()),
        (
            "VmSendMigrationData",
            serde_json::to_value(VmSendMigrationData {
                tls_dir: Some("/etc/tern/tls".into()),
                ..send_data()
            })
            .unwrap(),
        ),
        (
            "VmReceiveMigrationData",
            serde_json::to_value(VmReceiveMigrationData {
                receiver_url: "unix:/r".parse().unwrap(),
                devices: vec![tern_api::DeviceMapping {
                    id: "mtty0".into(),
                    path: "/sys/bus/mdev/devices/83b8f4f2-509f-382f-3c1e-e6bfe0fa1002".into(),
                }],
                tls_dir: Some("/etc/tern/tls".into()),
                memory_mode: MigrationMode::Precopy,
            })
            .unwrap(),
        ),
        (
            "MigrationStatus",
            serde_json::to_value(MigrationStatus::default()).unwrap(),
        ),
        (
            "MigrationStatus",
            serde_json::to_value(migration_status()).unwrap(),
        ),
        (
            "MigrationIteration",
            serde_json::to_value(iteration()).unwrap(),
        ),
        (
            "DirtyPagesBySource",
            serde_json::to_value(DirtyPagesBySource::default()).unwrap(),
        ),
    ];
    for (name, value) in cases {
        assert_eq!(property_names(&spec, name), keys(&value), "schema {name}");
        // Types match too: what the code emits is what the spec's type says.
        for (field, v) in value.as_object().unwrap() {
            let raw = &schema(&spec, name)["properties"][field];
            // `allOf: [$ref]` with `nullable` beside it: the null is the wrapper's to allow.
            if v.is_null() && raw["nullable"] == true {
                continue;
            }
            let prop = resolve(&spec, raw);
            check_type(&spec, name, field, prop, v);
        }
    }
}

/// Checks `v` against the spec's `prop`, and what it contains against the spec's nested schemas:
/// an object schema's properties, an array's items, a map's `additionalProperties`.
fn check_type(spec: &Value, schema_name: &str, field: &str, prop: &Value, v: &Value) {
    let ty = prop["type"].as_str();
    let ok = match (ty, v) {
        (_, Value::Null) => {
            prop["nullable"] == true || schema_name == "DeviceInfo" && field == "iommu"
        }
        (Some("string"), Value::String(_)) => true,
        (Some("integer"), Value::Number(n)) => n.is_u64() || n.is_i64(),
        (Some("boolean"), Value::Bool(_)) => true,
        (Some("array"), Value::Array(_)) => true,
        (Some("object"), Value::Object(_)) => true,
        _ => false,
    };
    assert!(
        ok,
        "{schema_name}.{field}: spec type {ty:?} (nullable {}) but code emits {v}",
        prop["nullable"]
    );
    match v {
        Value::Array(items) => {
            let item = resolve(spec, &prop["items"]);
            for (i, x) in items.iter().enumerate() {
                check_type(spec, schema_name, &format!("{field}[{i}]"), item, x);
            }
        }
        Value::Object(map) => {
            if let Some(props) = prop["properties"].as_object() {
                let spec_keys: BTreeSet<_> = props.keys().cloned().collect();
                assert_eq!(spec_keys, keys(v), "{schema_name}.{field} properties");
                for (k, x) in map {
                    // `allOf: [$ref]` + `nullable` (a nullable nested object): null is allowed
                    // by the wrapper, not by the schema it refers to.
                    if x.is_null() && props[k]["nullable"] == true {
                        continue;
                    }
                    let p = resolve(spec, &props[k]);
                    check_type(spec, schema_name, &format!("{field}.{k}"), p, x);
                }
            } else {
                let values = prop
                    .get("additionalProperties")
                    .filter(|a| a.is_object())
                    .unwrap_or_else(|| {
                        panic!("{schema_name}.{field}: a map needs additionalProperties")
                    });
                let values = resolve(spec, values);
                for (k, x) in map {
                    check_type(spec, schema_name, &format!("{field}[{k:?}]"), values, x);
                }
            }
        }
        _ => {}
    }
}

#[test]
fn nullable_fields_are_the_options() {
    let spec = spec();
    // DeviceInfo.iommu is nullable through allOf, checked by check_type; the flat ones here.
    for (name, value) in [
        (
            "MigrationStatus",
            serde_json::to_value(MigrationStatus::default()).unwrap(),
        ),
        (
            "VmConfigInfo",
            serde_json::to_value(VmConfigInfo::default()).unwrap(),
        ),
        (
            "PayloadConfig",
            serde_json::to_value(PayloadInfo::default()).unwrap(),
        ),
        (
            "SerialConfig",
            serde_json::to_value(SerialInfo::default()).unwrap(),
        ),
    ] {
        for (field, prop) in schema(&spec, name)["properties"].as_object().unwrap() {
            let is_null = value[field].is_null();
            assert_eq!(prop["nullable"] == true, is_null, "{name}.{field} nullable");
        }
    }
}

#[test]
fn enum_values_match_serde_names() {
    let spec = spec();
    fn names<T: serde::Serialize>(all: &[T]) -> Vec<Value> {
        all.iter()
            .map(|v| serde_json::to_value(v).unwrap())
            .collect()
    }
    let cases = [
        ("VmState", names(&VmState::ALL)),
        ("MigrationState", names(&MigrationState::ALL)),
        ("MigrationPass", names(&MigrationPass::ALL)),
        ("MigrationMode", names(&MigrationMode::ALL)),
        ("ConsoleMode", names(&ConsoleMode::ALL)),
    ];
    for (name, values) in cases {
        assert_eq!(
            schema(&spec, name)["enum"],
            Value::Array(values),
            "enum {name}"
        );
    }
    // Cloud Hypervisor's names first (what tern writes), then tern's older spellings, which
    // still parse to the same values.
    let spelled = schema(&spec, "TimeoutStrategy")["enum"].as_array().unwrap();
    let emitted = names(&TimeoutStrategy::ALL);
    assert_eq!(&spelled[..emitted.len()], &emitted[..]);
    for (i, name) in spelled.iter().enumerate() {
        let parsed: TimeoutStrategy = serde_json::from_value(name.clone()).unwrap();
        assert_eq!(parsed, TimeoutStrategy::ALL[i % emitted.len()], "{name}");
    }
}

/// Cloud Hypervisor's request fields for what tern lacks: the CH default is accepted, the spec's
/// `x-tern-refused.refused` value is refused with an error naming the field.
#[test]
fn refused_fields_accept_their_default_and_refuse_by_name() {
    let spec = spec();
    let cases = [
        ("VmSendMigrationData", json!({"destination_url": "tcp:h:1"})),
        ("VmReceiveMigrationData", json!({"receiver_url": "tcp:h:1"})),
    ];
    let mut seen = 0;
    for (name, base) in cases {
        for (field, prop) in schema(&spec, name)["properties"].as_object().unwrap() {
            let Some(refused) = prop.get("x-tern-refused") else {
                continue;
            };
            seen += 1;
            let parse = |v: &Value| -> Result<(), String> {
                let mut body = base.clone();
                body[field] = v.clone();
                match name {
                    "VmSendMigrationData" => serde_json::from_value::<VmSendMigrationData>(body)
                        .map(drop)
                        .map_err(|e| e.to_string()),
                    _ => serde_json::from_value::<VmReceiveMigrationData>(body)
                        .map(drop)
                        .map_err(|e| e.to_string()),
                }
            };
            let default = prop.get("default").expect("a refused field has a default");
            parse(default).unwrap_or_else(|e| panic!("{name}.{field} = {default}: {e}"));
            let err = parse(&refused["refused"]).expect_err(field);
            assert!(err.contains(field.as_str()), "{name}.{field}: {err}");
        }
    }
    assert_eq!(
        seen, 4,
        "preserve_source, vfio_fds, iommufd_fd, zone_updates"
    );
}

#[test]
fn error_body_is_an_array_of_strings() {
    let spec = spec();
    let s = schema(&spec, "ErrorBody");
    assert_eq!(s["type"], "array");
    assert_eq!(s["items"]["type"], "string");
    let body = tern_api::ApiError::NoVm.to_body();
    assert!(body
        .as_array()
        .is_some_and(|a| !a.is_empty() && a.iter().all(Value::is_string)));
}

/// For request bodies: `required` lists exactly the fields whose absence serde refuses, each other
/// field has a `default` equal to what serde fills in, and unknown fields are refused by both.
fn check_request_schema<T>(spec: &Value, name: &str, full: Value)
where
    T: serde::de::DeserializeOwned + serde::Serialize,
{
    let s = schema(spec, name);
    assert_eq!(
        s["additionalProperties"], false,
        "{name} must refuse unknown fields"
    );
    let mut with_extra = full.clone();
    with_extra["surely_unknown"] = json!(1);
    assert!(
        serde_json::from_value::<T>(with_extra).is_err(),
        "{name} accepts unknown fields"
    );

    let required: BTreeSet<String> = s["required"]
        .as_array()
        .map(|r| r.iter().map(|v| v.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default();
    let mut minimal = Map::new();
    for field in keys(&full) {
        let mut without = full.as_object().unwrap().clone();
        without.remove(&field);
        let refused = serde_json::from_value::<T>(Value::Object(without)).is_err();
        assert_eq!(
            refused,
            required.contains(&field),
            "{name}.{field} required"
        );
        if refused {
            minimal.insert(field.clone(), full[&field].clone());
        }
    }
    let filled =
        serde_json::to_value(serde_json::from_value::<T>(Value::Object(minimal)).unwrap()).unwrap();
    for field in keys(&full) {
        if required.contains(&field) {
            continue;
        }
        let prop = resolve(spec, &s["properties"][&field]);
        let default = prop
            .get("default")
            .unwrap_or_else(|| panic!("{name}.{field} is optional but has no default in the spec"));
        assert_eq!(default, &filled[&field], "{name}.{field} default");
    }
}

#[test]
fn request_schemas_match_required_fields_defaults_and_strictness() {
    let spec = spec();
    let mut full = send_data();
    full.local = true;
    full.destination_url = "unix:/d".parse().unwrap();
    check_request_schema::<VmSendMigrationData>(
        &spec,
        "VmSendMigrationData",
        serde_json::to_value(full).unwrap(),
    );
    check_request_schema::<VmReceiveMigrationData>(
        &spec,
        "VmReceiveMigrationData",
        json!({
            "receiver_url": "tcp:0.0.0.0:6000",
            "devices": [{"id": "edu0", "path": "/sys/bus/pci/devices/0000:00:04.0"}]
        }),
    );
}

#[test]
fn documented_connection_range_matches_validation() {
    let spec = spec();
    let prop = &schema(&spec, "VmSendMigrationData")["properties"]["connections"];
    let (min, max) = (
        prop["minimum"].as_u64().unwrap(),
        prop["maximum"].as_u64().unwrap(),
    );
    for n in [min - 1, min, max, max + 1] {
        let body = json!({"destination_url": "tcp:h:1", "connections": n});
        let ok = serde_json::from_value::<VmSendMigrationData>(body).is_ok();
        assert_eq!(ok, (min..=max).contains(&n), "connections {n}");
    }
}
