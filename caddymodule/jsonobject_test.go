package caddymodule

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
)

// sameMembers checks objectMembers against json.Unmarshal into a map[string]json.RawMessage:
// the same inputs accepted, and the same members, byte for byte.
func sameMembers(t *testing.T, data []byte) {
	t.Helper()
	var want map[string]json.RawMessage
	err := json.Unmarshal(data, &want)
	wantOK := err == nil && want != nil
	got, ok := objectMembers(data)
	if ok != wantOK {
		t.Fatalf("objectMembers(%q) accepts: %v; json.Unmarshal: %v (%v)", data, ok, wantOK, err)
	}
	if !ok {
		return
	}
	if len(got) != len(want) {
		t.Fatalf("objectMembers(%q): %d members, json.Unmarshal %d", data, len(got), len(want))
	}
	for k, v := range want {
		if g, ok := got[k]; !ok || !bytes.Equal(g, v) {
			t.Fatalf("objectMembers(%q)[%q] = %q (%v), json.Unmarshal %q", data, k, g, ok, v)
		}
	}
}

func TestObjectMembers(t *testing.T) {
	for _, c := range []string{
		`{}`, ` { } `, `{"a":1}`, "\t{\"a\" :\n[1, 2,{\"b\":null}]\r}\n",
		`{"a":1,"a":2}`, `{"\u0061":1,"a":2}`, `{"a":2,"\u0061":1}`, `{"\ud83d\ude00":1}`, `{"\ud83d":1}`,
		"{\"\xff\":1,\"\xfe\":2}", `{"é":"è"}`, `{"k":"\"\\\/\b\f\n\r\t\u00e9"}`,
		`{"n":-0.5e+10,"m":0,"o":1E-2,"p":-0}`, `{"t":true,"f":false,"z":null}`,
		// refused
		``, ` `, `null`, `[]`, `"s"`, `1`, `{`, `}`, `{"a"}`, `{"a":}`, `{"a":1,}`, `{,}`, `{"a":1}x`, `{"a":1}{}`,
		`{"a":01}`, `{"a":1.}`, `{"a":.1}`, `{"a":-}`, `{"a":1e}`, `{"a":+1}`, `{"a":tru}`, `{"a":nul}`, `{"a":True}`,
		"{\"a\":\"\x01\"}", `{"a":"\x"}`, `{"a":"\u12"}`, `{"a":"\u12G4"}`, `{"a":"`, `{"a":"\`, `{a:1}`, `{'a':1}`,
		`{"a":[1,]}`, `{"a":[,1]}`, `{"a":{"b":1,}}`, `{"a":{"b"}}`, `{"a":[1 2]}`, "{\"a\":1}\x00", "\ufeff{}",
		`{"a":"` + strings.Repeat("x", 100) + `"}`,
	} {
		sameMembers(t, []byte(c))
	}
}

// TestObjectMembersDepth: nesting refused where encoding/json refuses it, 10,000 levels.
func TestObjectMembersDepth(t *testing.T) {
	for _, depth := range []int{maxJSONDepth - 1, maxJSONDepth, maxJSONDepth + 1} {
		for _, open := range []string{"[", `{"k":`} {
			closing := "]"
			if open != "[" {
				closing = "}"
			}
			// The outer object is one level: depth levels in all.
			body := `{"a":` + strings.Repeat(open, depth-1) + strings.Repeat(closing, depth-1) + `}`
			sameMembers(t, []byte(body))
		}
	}
	if _, ok := objectMembers([]byte(`{"a":` + strings.Repeat("[", maxJSONDepth) + strings.Repeat("]", maxJSONDepth) + `}`)); ok {
		t.Fatal("10,001 levels accepted")
	}
}

// FuzzObjectMembers: whatever the input, objectMembers reads it as json.Unmarshal does.
func FuzzObjectMembers(f *testing.F) {
	for _, s := range []string{
		`{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":5}`,
		`{"a":1,"a":2,"\u0061":3}`, `{"x":[1,-2.5e3,true,false,null,{"y":"\ud83d\ude00"}]}`,
		"{\"\xff\":1}", `{"a":01}`, `{"a":"\u12"}`, `null`, ` {} `, `{"a":{}}x`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		sameMembers(t, data)
		var want string
		err := json.Unmarshal(data, &want)
		got, ok := stringValue(data)
		if wantOK := err == nil && string(bytes.TrimSpace(data)) != "null"; ok != wantOK || (ok && got != want) {
			t.Fatalf("stringValue(%q) = %q, %v; json.Unmarshal %q, %v", data, got, ok, want, err)
		}
		var wantBool bool
		err = json.Unmarshal(data, &wantBool)
		gotBool, ok := boolValue(data)
		if wantOK := err == nil && string(bytes.TrimSpace(data)) != "null"; ok != wantOK || (ok && gotBool != wantBool) {
			t.Fatalf("boolValue(%q) = %v, %v; json.Unmarshal %v, %v", data, gotBool, ok, wantBool, err)
		}
	})
}
