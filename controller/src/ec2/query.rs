//! The parameters of an EC2 Query request: form-encoded pairs with EC2's
//! list encodings (`InstanceId.1`, `Filter.1.Name`, `Filter.1.Value.1`,
//! `TagSpecification.1.Tag.1.Key`, …), each read with a clear
//! `MissingParameter` or `InvalidParameterValue` naming the parameter.

use std::collections::BTreeMap;

use super::Ec2Error;

/// The request's parameters (names are case-sensitive, as EC2's).
#[derive(Clone, Debug, Default)]
pub struct Params(BTreeMap<String, String>);

/// One `Filter.N`: its name and values.
pub type Filter = (String, Vec<String>);

impl Params {
    /// From `application/x-www-form-urlencoded` text (a query string or a
    /// POST body); a name given twice keeps its last value.
    pub fn parse(forms: &[&[u8]]) -> Self {
        let mut m = BTreeMap::new();
        for f in forms {
            for (k, v) in form_urlencoded::parse(f) {
                m.insert(k.into_owned(), v.into_owned());
            }
        }
        Params(m)
    }

    /// A parameter, if given.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// A parameter that must be given and not empty.
    pub fn required(&self, name: &str) -> Result<&str, Ec2Error> {
        self.get(name)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| Ec2Error::missing(name))
    }

    /// A whole number, if given.
    pub fn u64(&self, name: &str) -> Result<Option<u64>, Ec2Error> {
        self.get(name)
            .map(|v| {
                v.parse()
                    .map_err(|_| Ec2Error::invalid(format!("{name}: {v:?} is not a whole number")))
            })
            .transpose()
    }

    /// `true`/`false`, if given.
    pub fn bool(&self, name: &str) -> Result<Option<bool>, Ec2Error> {
        self.get(name)
            .map(|v| match v.to_ascii_lowercase().as_str() {
                "true" => Ok(true),
                "false" => Ok(false),
                _ => Err(Ec2Error::invalid(format!(
                    "{name}: {v:?} is not true or false"
                ))),
            })
            .transpose()
    }

    /// The indices N given as `prefix.N…`, in numeric order.
    fn indices(&self, prefix: &str) -> Vec<u32> {
        let dotted = format!("{prefix}.");
        let mut out: Vec<u32> = self
            .0
            .range(dotted.clone()..)
            .take_while(|(k, _)| k.starts_with(&dotted))
            .filter_map(|(k, _)| k[dotted.len()..].split('.').next()?.parse().ok())
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// `prefix.1`, `prefix.2`, … in numeric order.
    pub fn list(&self, prefix: &str) -> Vec<String> {
        self.indices(prefix)
            .into_iter()
            .filter_map(|n| self.get(&format!("{prefix}.{n}")).map(str::to_string))
            .collect()
    }

    /// `Filter.N.Name` with its `Filter.N.Value.M`.
    pub fn filters(&self) -> Result<Vec<Filter>, Ec2Error> {
        self.indices("Filter")
            .into_iter()
            .map(|n| {
                let name = self.required(&format!("Filter.{n}.Name"))?.to_string();
                let values = self.list(&format!("Filter.{n}.Value"));
                Ok((name, values))
            })
            .collect()
    }

    /// `prefix.N.Key` / `prefix.N.Value` pairs (a missing value is empty).
    pub fn tags(&self, prefix: &str) -> Result<Vec<(String, String)>, Ec2Error> {
        self.indices(prefix)
            .into_iter()
            .map(|n| {
                let key = self.required(&format!("{prefix}.{n}.Key"))?.to_string();
                let value = self
                    .get(&format!("{prefix}.{n}.Value"))
                    .unwrap_or_default()
                    .to_string();
                Ok((key, value))
            })
            .collect()
    }

    /// The tags of `TagSpecification.N` for `resource_type` (others are
    /// refused: this call makes only that type).
    pub fn tag_specifications(
        &self,
        resource_type: &str,
    ) -> Result<Vec<(String, String)>, Ec2Error> {
        let mut out = Vec::new();
        for n in self.indices("TagSpecification") {
            let ty = self.required(&format!("TagSpecification.{n}.ResourceType"))?;
            if ty != resource_type {
                return Err(Ec2Error::invalid(format!(
                    "TagSpecification.{n}.ResourceType: {ty:?} is not tagged by this call (only {resource_type:?})"
                )));
            }
            out.extend(self.tags(&format!("TagSpecification.{n}.Tag"))?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_filters_and_tags() {
        let p = Params::parse(&[
            b"Action=DescribeInstances&InstanceId.2=i-b&InstanceId.1=i-a&InstanceId.10=i-c\
              &Filter.1.Name=tag%3AName&Filter.1.Value.1=web&Filter.1.Value.2=db\
              &TagSpecification.1.ResourceType=instance&TagSpecification.1.Tag.1.Key=env\
              &TagSpecification.1.Tag.1.Value=ci+x",
        ]);
        assert_eq!(p.list("InstanceId"), ["i-a", "i-b", "i-c"]);
        assert_eq!(
            p.filters().unwrap(),
            [(
                "tag:Name".to_string(),
                vec!["web".to_string(), "db".to_string()]
            )]
        );
        assert_eq!(
            p.tag_specifications("instance").unwrap(),
            [("env".to_string(), "ci x".to_string())]
        );
        let e = p.tag_specifications("volume").unwrap_err();
        assert_eq!(e.code, "InvalidParameterValue");
        let p = Params::parse(&[b"Filter.1.Value.1=x&MaxResults=ten&DryRun=maybe"]);
        assert_eq!(p.filters().unwrap_err().code, "MissingParameter");
        assert!(p
            .u64("MaxResults")
            .unwrap_err()
            .message
            .contains("MaxResults"));
        assert!(p.bool("DryRun").is_err());
    }
}
