module github.com/flagsplit/flagsplit/bench/evalcompare

go 1.26.0

replace github.com/flagsplit/flagsplit => ../..

require (
	github.com/flagsplit/flagsplit v0.0.0-00010101000000-000000000000
	github.com/posthog/posthog-go v1.5.2
)

require (
	github.com/dlclark/regexp2 v1.12.0 // indirect
	github.com/hashicorp/golang-lru/v2 v2.0.7 // indirect
)
