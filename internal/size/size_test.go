package size

import "testing"

func TestParse(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int64
		bad  bool
	}{
		{"", 0, false}, {"0", 0, false}, {"1024", 1024, false}, {"512M", 512 << 20, false},
		{"10G", 10 << 30, false}, {"1.5T", 3 << 39, false}, {"2GiB", 2 << 30, false}, {" 4k ", 4 << 10, false},
		{"-1G", 0, true}, {"lots", 0, true}, {"NaN", 0, true}, {"Inf", 0, true},
		// The largest size an int64 holds in T is 8388607T; one more is refused.
		{"8388607T", 8388607 << 40, false}, {"8388608T", 0, true}, {"1e30", 0, true},
	} {
		got, err := Parse(tc.in)
		if (err != nil) != tc.bad || got != tc.want {
			t.Errorf("Parse(%q) = %d, %v; want %d (error %v)", tc.in, got, err, tc.want, tc.bad)
		}
	}
	if _, err := Parse("8191.99999P"); err == nil {
		t.Error("Parse accepted an unknown unit")
	}
}
