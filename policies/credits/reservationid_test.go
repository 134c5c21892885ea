package credits

import (
	"strings"
	"testing"
	"time"
)

// TestNewReservationID: 37 characters of base32hex, sorting by time to the microsecond;
// ids made in the same microsecond differ (128 random bits).
func TestNewReservationID(t *testing.T) {
	at := time.Unix(1_800_000_000, 0)
	var prev string
	for i := range 100 {
		id := NewReservationID(at.Add(time.Duration(i) * time.Microsecond))
		if len(id) != 37 || strings.Trim(id, reservationIDAlphabet) != "" {
			t.Fatalf("id %q: want 37 characters of %s", id, reservationIDAlphabet)
		}
		if id[:11] <= prev {
			t.Fatalf("id %d: %q does not sort after %q", i, id, prev)
		}
		prev = id[:11]
	}
	a, b := NewReservationID(at), NewReservationID(at)
	if a[:11] != b[:11] || a == b {
		t.Errorf("ids %s and %s", a, b)
	}
}
