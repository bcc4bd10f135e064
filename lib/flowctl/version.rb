# frozen_string_literal: true

module Flowctl
  VERSION = "0.1.0"
end
