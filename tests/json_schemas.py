"""JSON schemas for the structured-output acceptance runs: nested objects, arrays with min/max items, enums,
bounded integers and numbers, required and optional fields, additionalProperties false, anyOf/null, patterns."""

SCHEMAS = {
    "nested": {"type": "object", "properties": {
        "user": {"type": "object", "properties": {"name": {"type": "string"},
                                                  "age": {"type": "integer", "minimum": 0, "maximum": 150}},
                 "required": ["name", "age"], "additionalProperties": False}},
        "required": ["user"], "additionalProperties": False},
    "array_bounds": {"type": "object", "properties": {
        "items": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4}},
        "required": ["items"], "additionalProperties": False},
    "enums": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "size": {"enum": [1, 2, 3]}},
              "required": ["color", "size"], "additionalProperties": False},
    "bounded_numbers": {"type": "object", "properties": {
        "n": {"type": "integer", "minimum": -5, "maximum": 5}, "x": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["n", "x"], "additionalProperties": False},
    "optional_fields": {"type": "object", "properties": {
        "id": {"type": "string"}, "note": {"type": "string"}, "flag": {"type": "boolean"}},
        "required": ["id"], "additionalProperties": False},
    "array_of_objects": {"type": "object", "properties": {
        "people": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                             "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2}},
            "required": ["name"], "additionalProperties": False}}},
        "required": ["people"], "additionalProperties": False},
    "nullable_and_pattern": {"type": "object", "properties": {
        "value": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
        "code": {"type": "string", "pattern": "^[a-z]{2,5}$"}},
        "required": ["value", "code"], "additionalProperties": False},
}
