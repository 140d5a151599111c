#pragma once
#define NIBBLE_VERSION_STRING "0.1.0"
