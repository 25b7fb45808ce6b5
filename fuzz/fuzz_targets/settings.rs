//! The pipeline settings parser (the YAML file every service reads, and the durations in
//! it and in flags): any text gives settings that pass validation or an error, and
//! settings that parse survive a round trip through their YAML.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_core::PipelineSettings;
use sluice_core::settings::parse_duration;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = parse_duration(text);
    if let Ok(settings) = PipelineSettings::from_yaml(text) {
        let again = PipelineSettings::from_yaml(&settings.to_yaml())
            .expect("settings that parsed parse again from their own YAML");
        assert_eq!(again.to_yaml(), settings.to_yaml());
    }
});
