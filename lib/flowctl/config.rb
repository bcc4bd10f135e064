# frozen_string_literal: true

require "flowctl"
require_relative "config/schema"
require_relative "config/store"
require_relative "config/service"
require_relative "config/watcher"
